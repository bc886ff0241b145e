"""Altair charts for the book: one function per figure, interactive (tooltips, legend selection).

Charts take the tidy tables from :mod:`taskvec.publishing.sections` and know nothing the tables do
not say (layer counts, task names and categories all come from the data).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

CONDITIONS = ["baseline_acc", "hypothesis_acc", "regular_acc"]
CONDITION_NAMES = {"baseline_acc": "Baseline", "hypothesis_acc": "Hypothesis", "regular_acc": "Regular"}
CONDITION_COLORS = alt.Scale(domain=list(CONDITION_NAMES.values()), range=["#9e9e9e", "#e45756", "#4c78a8"])
SATURATED_MARK = " (saturated)"


def task_labels(frame: pd.DataFrame) -> pd.Series:
    """Task names, with SATURATED_MARK after those the query alone already does (column ``saturated``)."""
    if "saturated" not in frame:
        return frame["task"]
    return frame["task"] + frame["saturated"].fillna(False).astype(bool).map({True: SATURATED_MARK, False: ""})


def finding_layer(curves: pd.DataFrame) -> alt.Chart:
    """Fig. 3: dev accuracy of the patched query per layer, mean over tasks (thick) and per task (thin).

    Two panels, stacked: layer index, and relative depth (layer / (n_layers - 1)) so models of different
    depth line up. Click a task in the legend to highlight it.
    """
    data = curves.assign(task=task_labels(curves))
    mean = (data.groupby(["model", "layer", "relative_depth"], as_index=False)["dev_acc"].mean()
            .assign(task="mean over tasks"))
    pick = alt.selection_point(fields=["task"], bind="legend")
    panels = []
    for x, title in (("layer", "layer L"), ("relative_depth", "relative depth L / (layers - 1)")):
        lines = alt.Chart(data).mark_line(strokeWidth=1).encode(
            x=alt.X(f"{x}:Q", title=title),
            y=alt.Y("dev_acc:Q", title="dev accuracy (Hypothesis)", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("task:N", legend=alt.Legend(title="task (click)", orient="bottom", columns=4,
                                                        symbolLimit=40, labelLimit=160)),
            detail="model:N",
            opacity=alt.condition(pick, alt.value(0.9), alt.value(0.12)),
            tooltip=["model:N", "task:N", "layer:Q", alt.Tooltip("dev_acc:Q", format=".2f")],
        )
        if not panels:  # one selection, declared once, drives both panels
            lines = lines.add_params(pick)
        avg = alt.Chart(mean).mark_line(strokeWidth=4, color="black", point=True).encode(
            x=f"{x}:Q", y="dev_acc:Q", strokeDash=alt.StrokeDash("model:N", title="mean over tasks, model"),
            tooltip=["model:N", "layer:Q", alt.Tooltip("relative_depth:Q", format=".2f"),
                     alt.Tooltip("dev_acc:Q", title="mean dev accuracy", format=".2f")],
        )
        panels.append((lines + avg).properties(width=460, height=220))
    return alt.vconcat(*panels)


def accuracy_bars(intervals: pd.DataFrame) -> alt.Chart:
    """Fig. 2: Baseline / Hypothesis / Regular accuracy per task with 95% Wilson intervals (black
    rules), one panel per model; ``intervals`` is :func:`taskvec.publishing.sections.intervals`."""
    tasks = list(dict.fromkeys(intervals["task"]))
    data = intervals.assign(task=task_labels(intervals), order=intervals["task"].map(tasks.index),
                            condition=intervals["condition"].map(lambda c: CONDITION_NAMES[f"{c}_acc"]))
    order = alt.EncodingSortField(field="order", op="min")  # the tasks' order, whatever their label per model
    conditions = list(CONDITION_NAMES.values())
    pick = alt.selection_point(fields=["condition"], bind="legend")
    base = alt.Chart().encode(
        y=alt.Y("task:N", sort=order, title=None),
        yOffset=alt.YOffset("condition:N", sort=conditions),
        tooltip=["model:N", "task:N", "category:N", "format:N", "condition:N", "n:Q",
                 alt.Tooltip("accuracy:Q", format=".2f"), alt.Tooltip("lo:Q", title="95% CI low", format=".2f"),
                 alt.Tooltip("hi:Q", title="95% CI high", format=".2f"),
                 alt.Tooltip("best_layer:Q", title="L (best dev layer)")],
    )
    bars = base.mark_bar().encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy"),
        color=alt.Color("condition:N", scale=CONDITION_COLORS, sort=conditions,
                        legend=alt.Legend(title="condition (click)", orient="top")),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.15)),
    ).add_params(pick)
    rules = base.mark_rule(color="black", strokeWidth=1).encode(x=alt.X("lo:Q", title="accuracy"), x2="hi:Q")
    width = 330 if data["model"].nunique() == 1 else 190
    # Each panel its own task labels: "(saturated)" is a property of a task on one model.
    return alt.layer(bars, rules, data=data).properties(width=width, height=alt.Step(7)).facet(
        column=alt.Column("model:N", title=None)).resolve_scale(y="independent")


def per_task_vs_paper(intervals: pd.DataFrame, paper_tasks: pd.DataFrame) -> alt.Chart:
    """Per task and condition: this run (filled circle, 95% interval) beside the paper's published
    per-task results for GPT-J 6B, LLaMA 7B and Pythia 6.9B (hollow marks)."""
    ours = intervals.assign(source="this run", condition=intervals["condition"].map(lambda c: CONDITION_NAMES[f"{c}_acc"]))
    theirs = paper_tasks.melt(id_vars=["model", "task"], value_vars=CONDITIONS, var_name="condition",
                              value_name="accuracy").assign(source="paper")
    theirs["condition"] = theirs["condition"].map(CONDITION_NAMES)
    data = pd.concat([ours[["source", "model", "task", "condition", "accuracy", "lo", "hi"]], theirs], ignore_index=True)
    order = list(dict.fromkeys(data["task"]))
    models = list(dict.fromkeys(data["model"]))
    palette = ["#e45756", "#4c78a8", "#54a24b", "#b279a2", "#f58518", "#72b7b2", "#9d755d"]
    color = alt.Color("model:N", scale=alt.Scale(domain=models, range=palette[: len(models)]),
                      legend=alt.Legend(title="model", orient="top", columns=4))
    y = alt.Y("task:N", sort=order, title=None)
    tips = ["source:N", "model:N", "task:N", "condition:N", alt.Tooltip("accuracy:Q", format=".2f"),
            alt.Tooltip("lo:Q", title="95% CI low", format=".2f"), alt.Tooltip("hi:Q", title="95% CI high", format=".2f")]
    # Filled circles this run, hollow squares the paper: a shape legend says so.
    shape = alt.Shape("source:N", scale=alt.Scale(domain=["this run", "paper"], range=["circle", "square"]),
                      legend=alt.Legend(title="source (filled: this run)", orient="top"))
    paper_marks = alt.Chart().mark_point(size=40, filled=False, strokeWidth=1.5).encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy"), y=y, color=color, shape=shape,
        tooltip=tips).transform_filter(alt.datum.source == "paper")
    rules = alt.Chart().mark_rule(strokeWidth=1.5).encode(x="lo:Q", x2="hi:Q", y=y, color=color).transform_filter(
        alt.datum.source == "this run")
    dots = alt.Chart().mark_point(size=60, filled=True, opacity=1).encode(
        x="accuracy:Q", y=y, color=color, shape=shape, tooltip=tips).transform_filter(alt.datum.source == "this run")
    # Three panels across the text column (960 px at 1280), labels at a readable size.
    return alt.layer(paper_marks, rules, dots, data=data).properties(width=220, height=alt.Step(16)).facet(
        column=alt.Column("condition:N", sort=list(CONDITION_NAMES.values()), title=None)
    ).configure_axis(labelFontSize=11, titleFontSize=12).configure_legend(labelFontSize=11)


def depth_vs_paper(curves: pd.DataFrame, paper_curves: pd.DataFrame) -> alt.Chart:
    """Mean dev accuracy over tasks against relative depth: this run (thick) and the paper's three
    models (thin, dashed), from the authors' published per-layer results."""
    ours = curves.groupby(["model", "relative_depth"], as_index=False)["dev_acc"].mean().assign(source="this run")
    theirs = (paper_curves.groupby(["model", "relative_depth"], as_index=False)["dev_acc"].mean()
              .assign(source="paper (published results)"))
    data = pd.concat([ours, theirs], ignore_index=True)
    return alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=alt.X("relative_depth:Q", title="relative depth L / (layers - 1)"),
        y=alt.Y("dev_acc:Q", title="mean dev accuracy over tasks", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("model:N", legend=alt.Legend(title="model", orient="bottom")),
        strokeDash=alt.StrokeDash("source:N", sort=["this run", "paper (published results)"],
                                  legend=alt.Legend(title="source", orient="bottom", symbolType="stroke",
                                                    symbolStrokeColor="#333", symbolStrokeWidth=2)),
        strokeWidth=alt.condition(alt.datum.source == "this run", alt.value(3.5), alt.value(1.5)),
        tooltip=["source:N", "model:N", alt.Tooltip("relative_depth:Q", format=".2f"),
                 alt.Tooltip("dev_acc:Q", title="mean dev accuracy", format=".2f")],
    ).properties(width="container", height=240)  # fits a phone too


def tsne_scatter(points: pd.DataFrame) -> alt.Chart:
    """Fig. 5: t-SNE of task vectors, one colour per task; click a task in the legend to isolate it."""
    return tsne_panels({"": points})


def tsne_panels(panels: dict[str, pd.DataFrame]) -> alt.Chart:
    """One t-SNE panel per model (title: the key), stacked; one legend selection drives them all (declared on
    the first panel only, so it is one selection and not a copy per panel)."""
    pick = alt.selection_point(fields=["task"], bind="legend")
    charts = []
    for i, (title, points) in enumerate(panels.items()):
        # The legend names each task once (a task saturated on one model only is marked in the tooltip), with
        # twenty distinct colours, and the category shapes drawn large enough to tell apart.
        points = points.assign(saturated=points["saturated"] if "saturated" in points else False)
        chart = alt.Chart(points).mark_point(filled=True, size=45).encode(
            x=alt.X("x:Q", title="t-SNE 1", axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y("y:Q", title="t-SNE 2", axis=alt.Axis(labels=False, ticks=False)),
            color=alt.Color("task:N", scale=alt.Scale(scheme="category20"),
                            legend=alt.Legend(title="task (click)", columns=2, symbolLimit=40)),
            shape=alt.Shape("category:N", legend=alt.Legend(symbolSize=120, symbolFillColor="#666")),
            opacity=alt.condition(pick, alt.value(0.85), alt.value(0.08)),
            tooltip=["task:N", "category:N", "saturated:N"],
        ).properties(width=360, height=360, title=title)
        charts.append(chart.add_params(pick) if i == 0 else chart)
    return charts[0] if len(charts) == 1 else alt.vconcat(*charts)


def distance_histogram(distances: pd.DataFrame, bins: int = 40) -> alt.Chart:
    """Fig. 9 / distance histograms: cosine distance of task-vector pairs, within vs between tasks, as bars,
    one panel per model (column ``model``, if any).

    Binned in pandas (the pairs number in the hundreds of thousands); each histogram is
    normalized to a fraction of its pairs so the two are comparable.
    """
    if "model" not in distances:
        distances = distances.assign(model="")
    rows = []
    for model, part in distances.groupby("model", sort=False):
        edges = np.linspace(0.0, float(max(part["distance"].max(), 1e-6)), bins + 1)
        for pair, group in part.groupby("pair"):
            counts, _ = np.histogram(group["distance"], bins=edges)
            for lo, hi, c in zip(edges[:-1], edges[1:], counts):
                rows.append({"model": model, "pair": pair, "start": lo, "end": hi,
                             "fraction": c / max(len(group), 1), "pairs": int(c)})
    data = pd.DataFrame(rows)
    chart = alt.Chart(data).mark_bar(opacity=0.6, binSpacing=0).encode(
        x=alt.X("start:Q", title="cosine distance between two task vectors"), x2="end:Q",
        y=alt.Y("fraction:Q", title="fraction of pairs", stack=None), y2=alt.datum(0),
        color=alt.Color("pair:N", scale=alt.Scale(domain=["within", "between"], range=["#4c78a8", "#f58518"]),
                        legend=alt.Legend(title="pair of vectors from", orient="top")),
        tooltip=["model:N", "pair:N", alt.Tooltip("start:Q", format=".3f"), alt.Tooltip("end:Q", format=".3f"),
                 "pairs:Q", alt.Tooltip("fraction:Q", format=".3f")],
    ).properties(width=480, height=200)
    if data["model"].nunique() > 1:
        return chart.facet(row=alt.Row("model:N", title=None)).resolve_scale(x="independent")
    return chart


def dominance_bars(table: pd.DataFrame) -> alt.Chart:
    """Table 2 as bars: accuracy w.r.t. task A and task B, without (Regular) and with θ_B (Conflicting)."""
    data = table.assign(pair=table["task_a"] + " | θ " + table["task_b"]).melt(
        id_vars=["model", "pair", "condition"], value_vars=["acc_a", "acc_b"], var_name="scored_as",
        value_name="accuracy")
    data["scored_as"] = data["scored_as"].map({"acc_a": "task A (demonstrations)", "acc_b": "task B (θ)"})
    return alt.Chart(data).mark_bar().encode(
        y=alt.Y("pair:N", title=None),
        yOffset="scored_as:N",
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("scored_as:N", scale=alt.Scale(range=["#4c78a8", "#e45756"]),
                        legend=alt.Legend(title="accuracy with respect to", orient="bottom")),
        column=alt.Column("condition:N", sort=["regular", "conflicting", "conflicting_tuned"], title=None),
        row=alt.Row("model:N", title=None),
        tooltip=["model:N", "pair:N", "condition:N", "scored_as:N", alt.Tooltip("accuracy:Q", format=".2f")],
    ).properties(width=130, height=alt.Step(14))  # three conditions side by side fit the text column


def comparison_dots(table: pd.DataFrame, spans: pd.DataFrame | None = None) -> alt.Chart:
    """Mean accuracy per model and condition: this run (filled, with its 95% interval from ``spans``,
    :func:`taskvec.publishing.sections.mean_intervals`) beside the paper's Table 6 (hollow)."""
    long = table.melt(id_vars=["source", "model"], value_vars=CONDITIONS, var_name="condition", value_name="accuracy")
    long["condition"] = long["condition"].map(CONDITION_NAMES)
    order = list(dict.fromkeys(table["model"]))
    y = alt.Y("model:N", sort=order, title=None)
    # Legends below the plot: a container-wide chart keeps its whole width for the points on a phone.
    color = alt.Color("condition:N", scale=CONDITION_COLORS, sort=list(CONDITION_NAMES.values()),
                      legend=alt.Legend(orient="bottom"))
    sources = list(dict.fromkeys(["this run", *long["source"]]))
    dots = alt.Chart(long).mark_point(size=120, strokeWidth=2).encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="mean accuracy over tasks"),
        y=y, color=color,
        # The legend says which mark is which: filled circles this run, hollow squares the paper.
        shape=alt.Shape("source:N", scale=alt.Scale(domain=sources, range=["circle", "square"][:len(sources)]),
                        legend=alt.Legend(title="source (filled: this run)", orient="bottom")),
        fill=alt.condition(alt.datum.source == "this run", alt.Color("condition:N", scale=CONDITION_COLORS),
                           alt.value("transparent")),
        tooltip=["source:N", "model:N", "condition:N", alt.Tooltip("accuracy:Q", format=".2f")],
    )
    if spans is None or spans.empty:
        return dots.properties(width="container", height=alt.Step(26))
    ranges = spans.assign(condition=spans["condition"].map(lambda c: CONDITION_NAMES[f"{c}_acc"]))
    rules = alt.Chart(ranges).mark_rule(strokeWidth=2).encode(
        x="lo:Q", x2="hi:Q", y=y, color=color,
        tooltip=["model:N", "condition:N", alt.Tooltip("lo:Q", title="95% CI low", format=".2f"),
                 alt.Tooltip("hi:Q", title="95% CI high", format=".2f")])
    return alt.layer(rules, dots).properties(width="container", height=alt.Step(26))  # fits a phone too


#: Column names as a reader sees them (the data keep their names; only the page's header changes).
COLUMN_LABELS = {
    "baseline_acc": "Baseline", "hypothesis_acc": "Hypothesis", "regular_acc": "Regular",
    "baseline_ci": "Baseline 95% CI", "hypothesis_ci": "Hypothesis 95% CI", "regular_ci": "Regular 95% CI",
    "hypothesis_over_regular": "Hypothesis / Regular", "n_tasks": "tasks", "n_layers": "layers",
    "peak_layer": "best layer", "peak_depth": "best depth", "peak_acc": "best mean acc",
    "edge_acc": "mean acc at first and last layer", "plateau_first": "plateau from (depth)",
    "plateau_last": "plateau to (depth)", "saturated_layers": "saturated tasks (layer)",
    "flat_layers": "flat tasks (layer)", "baseline": "Baseline", "hypothesis": "Hypothesis", "regular": "Regular",
    "first_token": "first token", "lenient": "lenient", "first_token_acc": "first token", "full_answer_acc": "whole answer",
}

#: What a table shows where it has no value (the caption says why).
MISSING = "–"


def table(frame: pd.DataFrame, digits: int = 2):
    """A table for the book: no index column, floats rounded to ``digits``, readable column names
    (:data:`COLUMN_LABELS`), and a dash where a value is missing."""
    return frame.rename(columns=COLUMN_LABELS).style.hide(axis="index").format(precision=digits, na_rep=MISSING)


def dominance_layers(curve: pd.DataFrame) -> alt.Chart:
    """Per pair: accuracy w.r.t. A and B on dev prompts, with θ_B patched at each layer (the layer sweep
    that picks the conflicting layer)."""
    values = [v for v in ("acc_a", "acc_b", "b_alone") if v in curve.columns]
    data = curve.assign(pair=curve["task_a"] + " | θ " + curve["task_b"]).melt(
        id_vars=["model", "pair", "layer"], value_vars=values, var_name="scored_as", value_name="accuracy")
    names = {"acc_a": "task A (demonstrations)", "acc_b": "task B (θ)", "b_alone": "task B alone (its own prompts)"}
    data["scored_as"] = data["scored_as"].map(names)
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("layer:Q", title="layer L where θ of B is patched"),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="dev accuracy"),
        color=alt.Color("scored_as:N", scale=alt.Scale(domain=[names[v] for v in values],
                                                        range=["#4c78a8", "#e45756", "#54a24b"][:len(values)]),
                        legend=alt.Legend(title="accuracy with respect to", orient="bottom")),
        strokeDash=alt.StrokeDash("model:N", legend=alt.Legend(title="model", orient="bottom")),
        facet=alt.Facet("pair:N", columns=3, title=None),
        tooltip=["model:N", "pair:N", "layer:Q", "scored_as:N", alt.Tooltip("accuracy:Q", format=".2f")],
    ).properties(width=190, height=120)


def format_effect(both: pd.DataFrame) -> alt.Chart:
    """Each word task's accuracy written bare (hollow) and as the format rule writes it (filled), with 95%
    intervals, one panel per condition; ``both`` is :func:`taskvec.publishing.sections.intervals` of the two runs with a
    ``written`` column ("bare" or "rule")."""
    data = both.assign(condition=both["condition"].map(lambda c: CONDITION_NAMES[f"{c}_acc"]))
    order = list(dict.fromkeys(data["task"]))
    y = alt.Y("task:N", sort=order, title=None)
    yoff = alt.YOffset("written:N", sort=["bare", "rule"])
    color = alt.Color("condition:N", scale=CONDITION_COLORS, sort=list(CONDITION_NAMES.values()), legend=None)
    tips = ["task:N", "written:N", "condition:N", "n:Q", alt.Tooltip("accuracy:Q", format=".2f"),
            alt.Tooltip("lo:Q", title="95% CI low", format=".2f"), alt.Tooltip("hi:Q", title="95% CI high", format=".2f")]
    rules = alt.Chart().mark_rule().encode(
        x=alt.X("lo:Q", title="accuracy", scale=alt.Scale(domain=[0, 1])), x2="hi:Q", y=y, yOffset=yoff, color=color)
    marks = alt.Chart().mark_point(size=50, strokeWidth=2).encode(
        x="accuracy:Q", y=y, yOffset=yoff, color=color,
        fill=alt.condition(alt.datum.written == "rule", color, alt.value("white")), tooltip=tips)
    rows = {"row": alt.Row("model:N", title=None)} if "model" in data and data["model"].nunique() > 1 else {}
    return alt.layer(rules, marks, data=data).properties(width=140, height=alt.Step(11)).facet(
        column=alt.Column("condition:N", sort=list(CONDITION_NAMES.values()), title=None), **rows)


#: Conditions as the beyond-the-paper tables name them (``condition`` column).
CONDITION_LABELS = {"baseline": "Baseline", "hypothesis": "Hypothesis", "every": "Every step", "regular": "Regular"}
#: Beyond one token adds a control, θ written at every generated position ("Every step"), in its own colour.
LONG_COLORS = alt.Scale(domain=list(CONDITION_LABELS.values()), range=["#9e9e9e", "#e45756", "#f58518", "#4c78a8"])


def first_vs_full(table: pd.DataFrame) -> alt.Chart:
    """Per task and condition: first-token accuracy (open circle) and full-answer accuracy (filled), joined
    by a line; one panel per model. ``table``: :func:`taskvec.studies.long_answers.accuracy_table` with ``model``."""
    data = table.assign(condition=table["condition"].map(CONDITION_LABELS),
                        label=table["task"] + " (" + table["answer_tokens"].round(1).astype(str) + " tok)")
    y = alt.Y("label:N", title="task (mean answer length in tokens)", sort=alt.SortField("answer_tokens"))
    offset = alt.YOffset("condition:N", sort=list(CONDITION_LABELS.values()))
    color = alt.Color("condition:N", scale=LONG_COLORS, legend=alt.Legend(title="condition", orient="top"))
    tip = ["model:N", "task:N", "condition:N", alt.Tooltip("first_token_acc:Q", title="first token", format=".2f"),
           alt.Tooltip("full_answer_acc:Q", title="full answer", format=".2f"), "n:Q",
           alt.Tooltip("answer_tokens:Q", title="mean answer tokens", format=".1f")]
    rules = alt.Chart().mark_rule(strokeWidth=1.5).encode(
        x=alt.X("full_answer_acc:Q", title="accuracy (open: first token, filled: full answer)",
                scale=alt.Scale(domain=[0, 1])), x2="first_token_acc:Q", y=y, yOffset=offset, color=color, tooltip=tip)
    first = alt.Chart().mark_point(filled=False, size=40).encode(x="first_token_acc:Q", y=y, yOffset=offset,
                                                                color=color, tooltip=tip)
    full = alt.Chart().mark_point(filled=True, size=40, opacity=1).encode(x="full_answer_acc:Q", y=y, yOffset=offset,
                                                                         color=color, tooltip=tip)
    return alt.layer(rules, first, full, data=data).properties(width=380, height=alt.Step(8)).facet(
        row=alt.Row("model:N", title=None, header=alt.Header(labelFontWeight="bold", labelAngle=0, labelAlign="left")),
    ).resolve_scale(y="independent")


def by_length(table: pd.DataFrame) -> alt.Chart:
    """Full-answer (solid) and first-token (dashed) accuracy against the answer's length in tokens, pooled
    over tasks, per condition and model. ``table``: :func:`taskvec.studies.long_answers.by_length` with ``model``."""
    data = table.assign(condition=table["condition"].map(CONDITION_LABELS)).melt(
        id_vars=["model", "length", "length_label", "condition", "n"], value_vars=["full_answer_acc", "first_token_acc"],
        var_name="metric", value_name="accuracy")
    data["metric"] = data["metric"].map({"full_answer_acc": "full answer", "first_token_acc": "first token"})
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("length_label:O", title="answer length (tokens)", sort=sorted(data["length_label"].unique(),
                                                                              key=lambda s: int(s.rstrip("+")))),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("condition:N", scale=LONG_COLORS, legend=alt.Legend(orient="top")),
        # Solid full answer, dashed first token: the caption says so (a dash legend draws blank here).
        strokeDash=alt.StrokeDash("metric:N", sort=["full answer", "first token"], legend=None),
        tooltip=["model:N", "condition:N", "metric:N", "length_label:N", alt.Tooltip("accuracy:Q", format=".2f"), "n:Q"],
    ).properties(width=300, height=200).facet(column=alt.Column("model:N", title=None))


def _curve(summary: pd.DataFrame, x: str, title: str, log: bool) -> alt.Chart:
    """Accuracy against ``x`` per condition: one thin line per task (its name in the tooltip), the mean
    over tasks thick."""
    data = summary.assign(condition=summary["condition"].map(CONDITION_LABELS))
    tasks, mean = data[data["task"] != "mean"], data[data["task"] == "mean"]
    scale = alt.Scale(type="log", base=2) if log else alt.Scale(zero=False)
    axis = alt.Axis(values=[int(v) for v in sorted(data[x].unique())], format="d")
    # Only the conditions drawn are in the legend (the contexts curve draws no Regular line).
    colors = dict(zip(LONG_COLORS.domain, LONG_COLORS.range))
    drawn = [c for c in colors if c in set(data["condition"])]
    color = alt.Color("condition:N", scale=alt.Scale(domain=drawn, range=[colors[c] for c in drawn]),
                      legend=alt.Legend(orient="top"))
    thin = alt.Chart(tasks).mark_line(strokeWidth=1, opacity=0.35, point=alt.OverlayMarkDef(size=14, opacity=0.35)).encode(
        x=alt.X(f"{x}:Q", title=title, scale=scale, axis=axis),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color=color, detail="task:N",
        tooltip=["model:N", "task:N", "condition:N", f"{x}:Q", alt.Tooltip("accuracy:Q", format=".2f")])
    thick = alt.Chart(mean).mark_line(strokeWidth=4, point=alt.OverlayMarkDef(size=50)).encode(
        x=f"{x}:Q", y="accuracy:Q", color=color,
        tooltip=["model:N", "condition:N", f"{x}:Q", alt.Tooltip("accuracy:Q", title="mean over tasks", format=".2f")])
    return alt.layer(thin, thick).properties(width=300, height=220)


def shots_curve(summary: pd.DataFrame) -> alt.Chart:
    """Hypothesis and Regular accuracy against the number of demonstrations, per task (thin; hover for its
    name) and the mean (thick); one panel per model. ``summary``: :func:`taskvec.studies.context.curve_summary` with ``model``."""
    return alt.hconcat(*[_curve(group, "shots", f"demonstrations in the prompt ({m})", log=False)
                         for m, group in summary.groupby("model", sort=False)])


def contexts_curve(summary: pd.DataFrame) -> alt.Chart:
    """Hypothesis accuracy on held-out queries against the number of prompts θ is averaged over (log 2
    axis), per task (thin) and the mean (thick), the Baseline mean as a grey rule; one panel per model."""
    panels = []
    for m, group in summary.groupby("model", sort=False):
        hyp = group[group["condition"] == "hypothesis"]
        base = group[(group["condition"] == "baseline") & (group["task"] == "mean")]
        rule = alt.Chart(base).mark_rule(color="#9e9e9e", strokeDash=[4, 3], strokeWidth=2).encode(
            y="accuracy:Q", tooltip=[alt.Tooltip("accuracy:Q", title="Baseline, mean over tasks", format=".2f")])
        panels.append(alt.layer(_curve(hyp, "k", f"prompts averaged into θ ({m})", log=True), rule))
    return alt.hconcat(*panels)


def share_by_size(points: pd.DataFrame) -> alt.Chart:
    """The share of in-context accuracy that θ keeps (Hypothesis / Regular) against parameters on a log axis:
    the paper's models (hollow) and this run's (filled, with the interval over tasks). ``points``: model,
    parameters, share, lo, hi (NaN for the paper's), source ("paper (Table 6)" or "this run")."""
    sources = ["this run", "paper (Table 6)"]
    base = alt.Chart(points).encode(
        x=alt.X("parameters:Q", scale=alt.Scale(type="log"), title="parameters (log scale)",
                axis=alt.Axis(format="~s", labelExpr="replace(datum.label, 'G', 'B')")),
        y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1.2]), title="Hypothesis / Regular (share of ICL kept)",
                axis=alt.Axis(format="%")),
        color=alt.Color("source:N", scale=alt.Scale(domain=sources, range=["#e45756", "#4c78a8"]),
                        legend=alt.Legend(title=None, orient="top")),
        shape=alt.Shape("source:N", scale=alt.Scale(domain=sources, range=["circle", "square"]),
                        legend=alt.Legend(title=None, orient="top")),
        tooltip=["model:N", "source:N", alt.Tooltip("parameters:Q", format=".3~s"), alt.Tooltip("share:Q", format=".0%"),
                 alt.Tooltip("lo:Q", format=".0%", title="interval from"), alt.Tooltip("hi:Q", format=".0%", title="interval to")],
    )
    bars = base.transform_filter("isValid(datum.lo)").mark_rule(strokeWidth=2).encode(y="lo:Q", y2="hi:Q")
    # Filled: this run; hollow: the paper (one legend: colour, shape and fill share the field and title).
    dots = base.mark_point(size=90, strokeWidth=2, filled=False).encode(
        fill=alt.Fill("source:N", scale=alt.Scale(domain=sources, range=["#e45756", "white"]),
                      legend=alt.Legend(title=None, orient="top")))
    # Only this run's points are named: the paper's seven sit close together (their names are in the tooltip).
    labels = base.transform_filter("datum.source == 'this run'").mark_text(align="left", dx=8, dy=-8, fontSize=11).encode(
        text="model:N")
    return (bars + dots + labels).properties(width="container", height=280)


def show_token(token: str) -> str:
    """A token as a table shows it: in quotes so that its spaces show, and a character that draws nothing or
    draws as a box (a control or format character such as U+202A) written as its code point, ⟨U+202A⟩."""
    import unicodedata

    shown = "".join(f"⟨U+{ord(c):04X}⟩" if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Zl", "Zp") else c
                    for c in token)
    return f"'{shown}'"


def by_model(frame: pd.DataFrame, digits: int = 2):
    """One table per model where there are several (the model's name in bold above each), so no table
    repeats every task once per model with the model column pushed off to one side; with one model, one
    table without a model column (returned, to be shown as the cell's result)."""
    from IPython.display import HTML, display

    models = list(dict.fromkeys(frame["model"]))
    if len(models) == 1:
        return table(frame.drop(columns="model"), digits)
    for name in models:
        display(HTML(f"<p><b>{name}</b></p>"))
        display(table(frame[frame["model"] == name].drop(columns="model"), digits))
    return None


#: The heads study's conditions as a reader sees them, in the book's order.
HEAD_CONDITIONS = {"baseline": "Baseline (query alone)", "regular": "Regular (prompt)",
                   "hypothesis": "Hypothesis (θ replaces)", "theta_added": "θ added",
                   "fv_query": "FV + query alone", "fv_shuffled": "FV + shuffled prompt",
                   "hypothesis_ablated": "Hypothesis, top heads ablated",
                   "hypothesis_ablated_other": "Hypothesis, other heads ablated"}
HEAD_COLORS = alt.Scale(domain=list(HEAD_CONDITIONS.values()),
                        range=["#9e9e9e", "#4c78a8", "#e45756", "#f58518", "#54a24b", "#b79a20", "#b279a2", "#ff9da6"])


def heads_heatmap(effects: pd.DataFrame) -> alt.Chart:
    """The indirect effect of every (layer, head), one task at a time (a drop-down; "average" first): layers
    down, heads across, a diverging colour around zero. ``effects``: task, layer, head, effect
    (:func:`taskvec.studies.heads.effect_table`)."""
    tasks = ["average"] + [t for t in dict.fromkeys(effects["task"]) if t != "average"]
    pick = alt.param(name="task", value="average", bind=alt.binding_select(options=tasks, name="task "))
    top = float(effects["effect"].abs().max()) or 1.0
    return alt.Chart(effects).mark_rect().encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        color=alt.Color("effect:Q", scale=alt.Scale(scheme="redblue", reverse=True, domain=[-top, top]),
                        legend=alt.Legend(title="indirect effect", orient="right")),
        tooltip=["task:N", "layer:O", "head:O", alt.Tooltip("effect:Q", format="+.3f")],
    ).add_params(pick).transform_filter(alt.datum.task == pick).properties(width=alt.Step(48), height=alt.Step(16))


def head_conditions(intervals: pd.DataFrame) -> alt.Chart:
    """Accuracy under each condition of the heads study with its 95% Wilson interval, all tasks pooled (bars)
    and per task (dots, hover for the name). ``intervals``: task, condition, n, accuracy, lo, hi, with task
    "all" for the pooled rows (:func:`taskvec.studies.heads.conditions_table`)."""
    data = intervals.assign(condition=intervals["condition"].map(HEAD_CONDITIONS))
    order = list(HEAD_CONDITIONS.values())
    y = alt.Y("condition:N", sort=order, title=None)
    pooled = alt.Chart(data[data["task"] == "all"]).encode(y=y)
    bars = pooled.mark_bar().encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy (bars: all tasks; dots: each)"),
        color=alt.Color("condition:N", scale=HEAD_COLORS, sort=order, legend=None),
        tooltip=["condition:N", "n:Q", alt.Tooltip("accuracy:Q", format=".2f"),
                 alt.Tooltip("lo:Q", title="95% CI low", format=".2f"),
                 alt.Tooltip("hi:Q", title="95% CI high", format=".2f")])
    rules = pooled.mark_rule(color="black").encode(x="lo:Q", x2="hi:Q")
    dots = alt.Chart(data[data["task"] != "all"]).mark_point(color="black", size=30, filled=True, opacity=0.6).encode(
        y=y, x="accuracy:Q", tooltip=["task:N", "condition:N", "n:Q", alt.Tooltip("accuracy:Q", format=".2f")])
    return alt.layer(bars, rules, dots).properties(width="container", height=alt.Step(24))


def theta_and_heads(per_task: pd.DataFrame) -> alt.Chart:
    """Where θ comes from, per task: the cosine of the function vector with θ minus the query's own state
    (top), and Hypothesis accuracy with θ read as is, with the top heads ablated and with as many other heads
    ablated (bottom). ``per_task``: task, cosine, hypothesis, hypothesis_ablated, hypothesis_ablated_other.
    Fixed widths: a concatenation cannot take the container's (it would collapse on a phone)."""
    width = 240
    cos = alt.Chart(per_task).mark_bar(color="#54a24b").encode(
        y=alt.Y("task:N", title=None), x=alt.X("cosine:Q", scale=alt.Scale(domain=[-1, 1]),
                                              title="cosine(FV, θ − query state)"),
        tooltip=["task:N", alt.Tooltip("cosine:Q", format="+.2f")]).properties(width=width, height=alt.Step(18))
    shown = ["hypothesis", "hypothesis_ablated", "hypothesis_ablated_other"]
    long = per_task.melt(id_vars="task", value_vars=shown, var_name="condition", value_name="accuracy")
    long["condition"] = long["condition"].map(HEAD_CONDITIONS)
    names = [HEAD_CONDITIONS[c] for c in shown]
    colors = alt.Scale(domain=names, range=[HEAD_COLORS.range[list(HEAD_CONDITIONS).index(c)] for c in shown])
    pair = alt.Chart(long).encode(y=alt.Y("task:N", title=None))
    dots = pair.mark_point(size=70, filled=True).encode(
        x=alt.X("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="Hypothesis accuracy"),
        color=alt.Color("condition:N", scale=colors, sort=names,
                        legend=alt.Legend(title=None, orient="bottom", direction="vertical")),
        tooltip=["task:N", "condition:N", alt.Tooltip("accuracy:Q", format=".2f")])
    line = pair.mark_line(color="#9e9e9e").encode(x="accuracy:Q", detail="task:N")
    return alt.vconcat(cos, alt.layer(line, dots).properties(width=width, height=alt.Step(18)))
