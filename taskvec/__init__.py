"""taskvec: task vectors from in-context learning (Hendel, Geva, Globerson 2023) on any causal LM.

    model = load_model("gemma-3-270m")            # embedded, no hub needed
    result = run_main_experiment(model, load_tasks())
    result.accuracy                                 # Baseline / Hypothesis / Regular per task
"""

from .arch import DECLINED, LAYOUTS, Arch, UnsupportedArchitectureError, arch_for, resolve
from .experiment import MainResult, PromptSet, run_main_experiment, run_task, usable_counts
from .scoring import Scorer, choose_layer, single_token_examples
from .settings import Protocol
from .study import ModelRef, Skip, Skipped, Study, cached
from .mechanism import hidden_states, next_tokens, patched_next_tokens, task_vectors
from .models import EMBEDDED, TaskModel, UnknownModelError, load_model, wrap
from .prompts import FewShotPrompt, PromptFormat, read_jsonl, sample_prompts, sample_queries, write_jsonl
from .tasks import Example, Task, TaskFileError, UnknownTaskError, all_tasks, list_tasks, load_task, load_tasks

__version__ = "0.1.0"
