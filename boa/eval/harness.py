"""lm-eval-harness tasks on an in-memory model (the optional `eval` extra; its tasks download data, so online only)."""
from __future__ import annotations

from boa.core.errors import BoaError


def lm_eval_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} from lm-eval-harness's simple_evaluate."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise BoaError("lm-eval tasks need the eval extra: pip install 'boa[eval]'") from err
    try:
        out = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=tasks, limit=limit
        )
    except Exception as err:  # the harness fetches task data from the Hub
        raise BoaError(f"lm-eval failed for tasks {tasks} (its task data needs the Hugging Face Hub): {err}") from err
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}
