"""Evaluation: perplexity on the packaged corpora, lm-eval-harness tasks, and run reports."""
from boa.eval.perplexity import perplexity
from boa.eval.report import Report, peak_memory_mb

__all__ = ["Report", "evaluate_perplexity", "peak_memory_mb", "perplexity"]

EVAL_CORPORA = ("wikipedia", "austen")


def evaluate_perplexity(model, tokenizer, corpora=EVAL_CORPORA, seqlen: int = 512, max_windows: int | None = 64,
                        progress: bool = False) -> dict[str, float]:
    """{"ppl_<corpus>": perplexity} on each corpus's evaluation split, for a model in memory or a
    boa.models.StreamedModel (evaluated one block at a time: boa.eval.streamed)."""
    from boa.data import eval_tokens
    from boa.models.weights import StreamedModel

    score = perplexity
    if isinstance(model, StreamedModel):
        from boa.eval.streamed import streamed_perplexity as score
    return {
        f"ppl_{corpus}": score(model, eval_tokens(tokenizer, corpus), seqlen, max_windows, progress=progress)
        for corpus in corpora
    }
