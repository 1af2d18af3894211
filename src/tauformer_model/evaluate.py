"""lm-evaluation-harness on this package's models: ``python -m tauformer_model.evaluate MODEL [--tasks ...]``.

``pip install "tauformer[eval]"``. MODEL is a training run of ``python -m tauformer_model.train`` (its folder or
one of its checkpoints), a folder written by ``python -m tauformer_model.export``, or a Hugging Face model saved
after ``hf.enable_taumode``. Importing this module registers the model with lm-eval as ``taugpt``, so lm-eval's
own API takes it too: ``lm_eval.simple_evaluate(model="taugpt", model_args="pretrained=MODEL", tasks=[...],
task_manager=task_manager(MODEL, tasks))`` (the task manager: for this package's tasks).

The local task ``taugpt_val_loss`` (lm_eval_tasks/, shipped with the package: nothing is downloaded) scores
the windows that the trainer's validation loss scores (train.evaluate: Dataset.evaluation_starts over the val
split, eval_batches × batch_size windows of block_size + 1 tokens) and reports their mean loss in nats per
token, which is the run's val loss. Its requests are token ids, not text (see TauGPTLM.loglikelihood).

What else lm-eval can run (hellaswag, RULER's needle-in-a-haystack, ...) needs its data sets from the internet;
the README's section on lm-evaluation-harness has the commands.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # the package itself needs no lm-eval
    raise ImportError('tauformer_model.evaluate needs lm-evaluation-harness: pip install "tauformer[eval]"') from e

from .checkpoint import find_checkpoint, load_state
from .data import SEPARATOR, load_dataset, load_tokenizer
from .export import byte_tokenizer
from .hf import TauGPTForCausalLM, load_taumode

TASKS_DIR = pathlib.Path(__file__).parent / "lm_eval_tasks"
LOCAL_TASK = "taugpt_val_loss"
# A folder of neither kind gets the local task's windows from these (a run's own come from its train config).
DEFAULT_WINDOWS = 512


class EvaluationError(ValueError):
    """A model or a task setting this module cannot evaluate; the message names the argument."""


# ---------------------------------------------------------------------------------------------------------
# Loading what to evaluate
# ---------------------------------------------------------------------------------------------------------

def _fast_tokenizer(tok):
    """A `tokenizers` Tokenizer as the transformers tokenizer lm-eval calls."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def load_model_and_tokenizer(pretrained, device: str = "cpu"):
    """(model, tokenizer, context length) of ``pretrained``: a training run or checkpoint (TauGPTForCausalLM over
    its TauGPT, the run's tokenizer), an export folder (model type "taugpt"), or an enable_taumode folder
    (hf.load_taumode). The model is in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(str(pretrained))
    found = find_checkpoint(path) if path.is_dir() else None
    if found is not None:
        model = TauGPTForCausalLM.from_checkpoint(found, device)
        kind = load_state(found).get("train_config", {}).get("tokenizer", "byte")
        tok = load_tokenizer(kind, found)
        tokenizer = _fast_tokenizer(byte_tokenizer() if tok.kind == "byte" else tok.tok)
        context = model.config.max_position_embeddings
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        if isinstance(getattr(config, "taumode", None), dict):
            model = load_taumode(path)
        elif config.model_type == "taugpt":
            model = AutoModelForCausalLM.from_pretrained(path)
        else:
            raise EvaluationError(f"pretrained={pretrained}: a {config.model_type!r} model without taumode (its "
                                  "config.json has no 'taumode' entry); evaluate it with lm-eval's --model hf")
        tokenizer = AutoTokenizer.from_pretrained(path)
        context = getattr(config, "max_position_embeddings", None)
    else:
        raise EvaluationError(f"pretrained={pretrained}: neither a training run or checkpoint of this package (a "
                              "folder with a checkpoint/ link or model.safetensors + state.pt) nor a Hugging Face "
                              "model folder (config.json)")
    return model.to(device).eval(), tokenizer, context


def separator_id(tokenizer) -> int | None:
    """The id of SEPARATOR (a newline) when it is one token: in this package's corpus it opens every document."""
    ids = tokenizer.encode(SEPARATOR.decode(), add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# The model lm-eval calls
# ---------------------------------------------------------------------------------------------------------

TOKEN_IDS = "token_ids"


def token_request(context_ids, continuation_ids, context: str, continuation: str) -> tuple:
    """The arguments of a loglikelihood request given in token ids: (context text, continuation text,
    {TOKEN_IDS: (context ids, continuation ids)}). The texts are for people and lm-eval's logged samples (which
    hash them); the ids are what is scored. An extra last element is lm-eval's own way of carrying more than text
    (its multimodal requests carry their images so)."""
    return context, continuation, {TOKEN_IDS: (tuple(context_ids), tuple(continuation_ids))}


def is_token_request(args: tuple) -> bool:
    """Arguments made by token_request."""
    return len(args) == 3 and isinstance(args[2], dict) and TOKEN_IDS in args[2]


@register_model("taugpt")
class TauGPTLM(HFLM):
    """lm-eval's Hugging Face model (HFLM: its batching, log-softmax and scoring) over a model that
    load_model_and_tokenizer reads. ``max_length`` defaults to the model's context (a TauGPT's block_size).

    Our byte and BPE tokenizers have no BOS, EOS or padding token. A document of the training corpus starts
    after a newline (data.SEPARATOR), so the newline stands in for all three: the context of an empty prompt
    and of loglikelihood_rolling's first window, the stop of a generation, the padding of a batch (masked)."""

    def __init__(self, pretrained, device: str = "cpu", batch_size: int | str = 1, max_length: int | None = None,
                 **kwargs):
        model, tokenizer, context = load_model_and_tokenizer(pretrained, device)
        newline = separator_id(tokenizer)
        if newline is not None:
            for name in ("bos_token", "eos_token", "pad_token"):
                if getattr(tokenizer, name) is None:
                    # the id only: the newline added as a special token would change how text is encoded
                    setattr(tokenizer, name + "_id", newline)
        kwargs.setdefault("backend", "causal")  # the model type "taugpt" is not in transformers' own tables
        super().__init__(pretrained=model, tokenizer=tokenizer, max_length=max_length or context,
                         batch_size=batch_size, **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """lm-eval's loglikelihood, and requests given in token ids (is_token_request) scored as given.

        The local task's windows are token ids: a window of the val split may start or end inside a UTF-8
        character or a BPE merge, so its text would not encode back to the same tokens, and lm-eval moves the
        trailing whitespace of a text context into the continuation, which would score one token more than the
        trainer does whenever a window starts with a space or a newline."""
        by_ids = [i for i, r in enumerate(requests) if is_token_request(r.args)]
        if not by_ids:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        results = [None] * len(requests)
        given_in_ids = set(by_ids)
        as_text = [i for i in range(len(requests)) if i not in given_in_ids]
        if as_text:
            for i, r in zip(as_text, super().loglikelihood([requests[i] for i in as_text], disable_tqdm)):
                results[i] = r
        # lm-eval's tokenised form of a request: (its texts, context ids, continuation ids)
        tokenised = [(requests[i].args[:2], *map(list, requests[i].args[2][TOKEN_IDS])) for i in by_ids]
        for i, r in zip(by_ids, self._loglikelihood_tokens(tokenised, disable_tqdm=disable_tqdm)):
            results[i] = r
        return results


# ---------------------------------------------------------------------------------------------------------
# The local task's documents: the trainer's validation windows
# ---------------------------------------------------------------------------------------------------------

def validation_windows(pretrained, data: str | None = None, data_cache: str | None = None,
                       windows: int | None = None, block_size: int | None = None, log=print) -> list[dict]:
    """The token windows that train.evaluate scores for ``pretrained``, in its order: per window its start in
    the val split, its block_size + 1 tokens (the inputs and their shifted targets), and as text (for reading: a
    window may start or end inside a character) its first token (``context``) and the others (``continuation``).

    A training run: its train config gives the corpus, the tokenizer, block_size and the count
    (eval_batches × batch_size); ``data``/``data_cache``/``windows``/``block_size`` given here replace them. A
    Hugging Face folder has no train config: its tokenizer must be the byte tokenizer (export's), the corpus is
    ``data`` (default: the stdlib, as for train), block_size the model's context, ``windows`` default
    DEFAULT_WINDOWS."""
    path = pathlib.Path(str(pretrained))
    found = find_checkpoint(path) if path.is_dir() else None
    if found is not None:
        tc = load_state(found).get("train_config", {})
        if tc.get("pack_documents"):
            raise EvaluationError(f"pretrained={pretrained}: this run was trained with --pack-documents, whose val "
                                  "loss cuts attention at the documents inside a window; lm-eval scores a window "
                                  "as one sequence, so the local task would not be the run's val loss")
        tokenizer, vocab = tc.get("tokenizer", "byte"), tc.get("bpe_vocab_size", 4096)
        data = data if data is not None else tc.get("data")
        data_cache = data_cache if data_cache is not None else tc.get("data_cache")
        windows = windows or tc["eval_batches"] * tc["batch_size"]
        block_size = block_size or tc["model"]["block_size"]
        run_tokenizer = load_tokenizer(tokenizer, found)
    elif (path / "config.json").is_file():
        from transformers import AutoConfig, AutoTokenizer

        ids = AutoTokenizer.from_pretrained(path).encode("a\n\xe9", add_special_tokens=False)
        if ids != [97, 10, 0xC3, 0xA9]:
            raise EvaluationError(f"pretrained={pretrained}: the local task {LOCAL_TASK} reads the corpus in bytes, "
                                  "and this folder's tokenizer is not the byte tokenizer (python -m "
                                  "tauformer_model.export writes it for a byte run)")
        tokenizer, vocab, run_tokenizer = "byte", 256, None
        windows = windows or DEFAULT_WINDOWS
        block_size = block_size or getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    else:
        raise EvaluationError(f"pretrained={pretrained}: no training run, checkpoint or Hugging Face folder here")
    if not block_size or block_size < 1 or windows < 1:
        raise EvaluationError(f"the local task needs a positive block_size and windows, got {block_size} and "
                              f"{windows} (set them with --metadata)")
    dataset = load_dataset(data, data_cache, tokenizer, vocab, log=log)
    if run_tokenizer is not None and run_tokenizer.kind == "bpe" and \
            run_tokenizer.tok.to_str() != dataset.tokenizer.tok.to_str():
        raise EvaluationError(f"pretrained={pretrained}: the BPE tokenizer of the data cache {dataset.folder} is "
                              f"not the run's ({found / 'tokenizer.json'}): give the run's data_cache in --metadata")
    starts = dataset.evaluation_starts("val", windows, block_size)
    found_windows = [[int(t) for t in dataset.val[s:s + block_size + 1]] for s in starts]
    decode = dataset.tokenizer.decode
    return [{"start": s, "tokens": tokens, "context": decode(tokens[:1]), "continuation": decode(tokens[1:])}
            for s, tokens in zip(starts, found_windows)]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def task_manager(pretrained, tasks: list[str], metadata: dict | None = None, include_path: str | None = None):
    """An lm-eval TaskManager that knows this package's tasks (and ``include_path``'s), with ``pretrained`` in
    the tasks' metadata: where the local task reads its run. (lm-eval puts the model_args there itself only
    when it makes the TaskManager, which then lacks our tasks.)"""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    # indexing lm-eval's thousands of task files takes a while: only when a task is not ours
    ours = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    return TaskManager(include_path=paths, metadata={"pretrained": str(pretrained), **(metadata or {})},
                       include_defaults=not set(tasks) <= ours)


def evaluate(pretrained, tasks: list[str], device: str = "cpu", batch_size: int | str = 1, limit: float | None = None,
             metadata: dict | None = None, include_path: str | None = None, num_fewshot: int | None = None,
             model_args: dict | None = None) -> dict:
    """lm_eval.simple_evaluate of ``pretrained`` on ``tasks`` with this package's tasks included; its results.
    ``model_args``: more of HFLM's options, e.g. mixed_precision_dtype="bfloat16" (the trainer's GPU autocast)."""
    if not pathlib.Path(str(pretrained)).exists():
        raise EvaluationError(f"pretrained={pretrained}: no such file or folder")
    lm = TauGPTLM(pretrained, device=device, batch_size=batch_size, **(model_args or {}))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=task_manager(pretrained, tasks, metadata, include_path),
                                   log_samples=False, bootstrap_iters=0)


def local_task_score(results: dict) -> float:
    """The local task's mean loss in nats per token, from simple_evaluate's results."""
    return results["results"][LOCAL_TASK]["nats_per_token,none"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pretrained", help="a run folder or checkpoint of python -m tauformer_model.train, an export "
                                      "folder, or a Hugging Face folder saved after enable_taumode")
    p.add_argument("--tasks", default=LOCAL_TASK, help=f"comma-separated lm-eval task names (default {LOCAL_TASK}: "
                                                       "the run's val loss; others need lm-eval's data sets)")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--batch-size", default="1", help="requests per forward, or 'auto'")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1), for a "
                                                             "quick look; the local task then is not the val loss")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (the tasks' own default if unset)")
    p.add_argument("--metadata", default=None, help="JSON passed to the tasks, e.g. the local task's "
                                                    "'{\"data\": PATH, \"data_cache\": DIR, \"windows\": N, "
                                                    "\"block_size\": T}' (defaults: the run's)")
    p.add_argument("--model-args", default="", help="more options of lm-eval's HFLM as key=value,... e.g. "
                                                    "mixed_precision_dtype=bfloat16,softmax_dtype=float32")
    p.add_argument("--include-path", default=None, help="a folder of more task YAML files")
    p.add_argument("--output", default=None, help="write lm-eval's results (JSON) to this file")
    args = p.parse_args(argv)
    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except json.JSONDecodeError as e:
        p.error(f"--metadata is not JSON: {e}")
    if not isinstance(metadata, dict):
        p.error(f"--metadata must be a JSON object, got {args.metadata!r}")
    if not (args.batch_size.startswith("auto") or args.batch_size.isdigit() and int(args.batch_size) > 0):
        p.error(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}")
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        results = evaluate(args.pretrained, tasks, device=args.device, batch_size=batch_size, limit=args.limit,
                           metadata=metadata, include_path=args.include_path, num_fewshot=args.num_fewshot,
                           model_args=lm_eval.utils.simple_parse_args_string(args.model_args))
    except (EvaluationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(lm_eval.utils.make_table(results))
    if args.output:
        pathlib.Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
