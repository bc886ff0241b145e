"""Figures reported in the paper, for side-by-side comparison in the book (not results of this code).

Hendel, Geva, Globerson 2023, Table 6 means over the 18 tasks, and Table 2 (LLaMA 13B).
"""

import pandas as pd

#: Paper, Table 6: mean accuracy over the 18 tasks (Baseline / Hypothesis / Regular).
TABLE6_AVERAGES = pd.DataFrame(
    [
        ("GPT-J 6B", 28, 0.12, 0.68, 0.81),
        ("LLaMA 7B", 32, 0.13, 0.78, 0.86),
        ("LLaMA 13B", 40, 0.15, 0.79, 0.87),
        ("LLaMA 30B", 60, 0.16, 0.78, 0.90),
        ("Pythia 2.8B", 32, 0.13, 0.72, 0.83),
        ("Pythia 6.9B", 32, 0.11, 0.71, 0.82),
        ("Pythia 12B", 36, 0.11, 0.73, 0.82),
    ],
    columns=["model", "n_layers", "baseline_acc", "hypothesis_acc", "regular_acc"],
)

#: Paper, Section 5 / Fig. 3: the best layer sits in the middle of the network.
BEST_LAYER_RELATIVE_DEPTH = (0.3, 0.5)

#: Paper, Table 2 (LLaMA 13B), as summarized in ../shared/PAPER.md: Regular on A 0.51-0.98;
#: Conflicting on B 0.74-0.97 for 4 of 5 pairs; English->Spanish vs English->French stays on A.
TABLE2_SUMMARY = {"regular_on_a": (0.51, 0.98), "conflicting_on_b": (0.74, 0.97),
                  "translation_pair": {"acc_a": 0.91, "acc_b": 0.07}}
