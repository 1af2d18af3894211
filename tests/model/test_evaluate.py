"""lm-evaluation-harness integration (tauformer_model.evaluate): the local task taugpt_val_loss gives a run's
val loss (train.evaluate on the same windows) through lm-eval, for a training run, its export folder and a
Hugging Face model saved after enable_taumode."""

import contextlib
import json

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's Hugging Face model imports it
pytest.importorskip("transformers")

from helpers import run_trainer  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from tauformer_model import evaluate as ev  # noqa: E402
from tauformer_model import hf  # noqa: E402
from tauformer_model.checkpoint import find_checkpoint, load_model, load_state  # noqa: E402
from tauformer_model.config import TauGPTConfig  # noqa: E402
from tauformer_model.data import load_dataset  # noqa: E402
from tauformer_model.export import export, save_tokenizer  # noqa: E402
from tauformer_model.train import Dist, TrainConfig  # noqa: E402
from tauformer_model.train import evaluate as train_evaluate  # noqa: E402

TOLERANCE = 1e-5  # both sum fp32 log-probabilities of the same logits, in different orders


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A micro run (byte tokenizer) trained a few steps: (run folder, data cache). Its val loss is scored on
    2 batches of 3 windows of 32 tokens."""
    folder = tmp_path_factory.mktemp("evaluate")
    run, cache = folder / "run", folder / "cache"
    run_trainer(["--preset", "micro", "--data", str(corpus), "--data-cache", str(cache), "--out", str(run),
                 "--batch-size", "3", "--max-steps", "4", "--eval-every", "4", "--checkpoint-every", "4",
                 "--seed", "3", "--threads", "1", "--no-progress", "--device", "cpu"])
    return run, cache


def trainer_val_loss(run) -> float:
    """train.evaluate of the run's checkpoint, as the trainer calls it (one process, no autocast on the CPU)."""
    found = find_checkpoint(run)
    model, _ = load_model(found)
    saved = load_state(found)["train_config"]
    tc = TrainConfig(**{k: v for k, v in saved.items() if k != "model"})
    tc.model = model.config
    dataset = load_dataset(tc.data, tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=lambda *_: None)
    return train_evaluate(model, dataset, tc, "cpu", contextlib.nullcontext, Dist())


def test_local_task_of_a_run_is_its_val_loss(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "results.json"
    assert ev.main([str(run), "--batch-size", "4", "--output", str(out)]) == 0
    assert "taugpt_val_loss" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["n-samples"]["taugpt_val_loss"]["effective"] == 2 * 3  # eval_batches × batch_size windows
    expected = trainer_val_loss(run)
    assert ev.local_task_score(results) == pytest.approx(expected, abs=TOLERANCE)
    # the last row of the run's metrics is the same evaluation, written by the trainer itself
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert ev.local_task_score(results) == pytest.approx(last["val_loss"], abs=TOLERANCE)


def test_local_task_of_a_bpe_run_is_its_val_loss(tmp_path, corpus):
    """A BPE run: its windows (cut inside merges) are scored in the run's own token ids."""
    pytest.importorskip("tokenizers")
    run = tmp_path / "bpe"
    run_trainer(["--preset", "micro", "--data", str(corpus), "--data-cache", str(tmp_path / "cache"), "--out",
                 str(run), "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--batch-size", "3", "--max-steps", "2",
                 "--eval-every", "2", "--checkpoint-every", "2", "--seed", "4", "--threads", "1", "--no-progress",
                 "--device", "cpu"])
    results = ev.evaluate(run, [ev.LOCAL_TASK], batch_size=6)
    assert ev.local_task_score(results) == pytest.approx(trainer_val_loss(run), abs=TOLERANCE)


def test_lm_eval_builds_the_registered_model_from_its_name(trained):
    """lm-eval's own entry point, the model named "taugpt" with model_args as a string."""
    import lm_eval

    run, _ = trained
    results = lm_eval.simple_evaluate(model="taugpt", model_args=f"pretrained={run},max_batch_size=8",
                                      tasks=[ev.LOCAL_TASK], batch_size=2, device="cpu", bootstrap_iters=0,
                                      task_manager=ev.task_manager(run, [ev.LOCAL_TASK]))
    assert ev.local_task_score(results) == pytest.approx(trainer_val_loss(run), abs=TOLERANCE)


def test_export_folder_scores_the_same_windows(trained, tmp_path):
    """The export of the run (a Hugging Face folder: no train config) on the windows given as metadata."""
    run, cache = trained
    folder = export(run, tmp_path / "exported")
    saved = load_state(find_checkpoint(run))["train_config"]
    metadata = {"data": saved["data"], "data_cache": str(cache), "windows": 6, "block_size": 32}
    results = ev.evaluate(folder, [ev.LOCAL_TASK], batch_size=4, metadata=metadata)
    assert ev.local_task_score(results) == pytest.approx(trainer_val_loss(run), abs=TOLERANCE)


class HFLoss(torch.nn.Module):
    """train.evaluate's view of a model, model(x, y) -> mean cross-entropy, over a transformers causal LM."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, doc_ids=None, context_parallel=None):
        logits = self.model(x).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def test_enable_taumode_folder_scores_like_train_evaluate(trained, corpus, tmp_path):
    _, cache = trained
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=256, max_position_embeddings=64)
    model = hf.enable_taumode(AutoModelForCausalLM.from_config(config)).eval()
    model.save_pretrained(tmp_path / "llama")
    save_tokenizer(tmp_path / "llama")  # the byte tokenizer
    block_size, batch_size, eval_batches = 24, 2, 3
    metadata = {"data": str(corpus), "data_cache": str(cache), "windows": batch_size * eval_batches,
                "block_size": block_size}
    results = ev.evaluate(tmp_path / "llama", [ev.LOCAL_TASK], batch_size=3, metadata=metadata)

    tc = TrainConfig(batch_size=batch_size, eval_batches=eval_batches, model=TauGPTConfig(block_size=block_size))
    dataset = load_dataset(str(corpus), str(cache), "byte", log=lambda *_: None)
    expected = train_evaluate(HFLoss(hf.load_taumode(tmp_path / "llama")), dataset, tc, "cpu",
                              contextlib.nullcontext, Dist())
    assert ev.local_task_score(results) == pytest.approx(expected, abs=TOLERANCE)


def test_what_cannot_be_evaluated_is_named(trained, tmp_path, capsys):
    run, _ = trained
    assert ev.main([str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert "pretrained=" in error and "missing" in error
    for flags, named in ((["--metadata", "[1]"], "--metadata"), (["--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit):
            ev.main([str(run), *flags])
        assert named in capsys.readouterr().err
    with pytest.raises(ev.EvaluationError, match="pretrained=.*missing"):
        ev.evaluate(tmp_path / "missing", [ev.LOCAL_TASK])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvaluationError, match="neither a training run"):
        ev.load_model_and_tokenizer(tmp_path / "empty")
    # a run trained with --pack-documents: its val loss cuts windows at documents, lm-eval cannot
    packed = tmp_path / "packed"
    found = find_checkpoint(run)
    packed.mkdir()
    for name in ("model.safetensors", "state.pt"):
        (packed / name).write_bytes((found / name).read_bytes())
    state = torch.load(packed / "state.pt", weights_only=True)
    state["train_config"]["pack_documents"] = True
    torch.save(state, packed / "state.pt")
    with pytest.raises(ev.EvaluationError, match="pack-documents"):
        ev.validation_windows(packed)
    with pytest.raises(ev.EvaluationError, match="block_size and windows"):
        ev.validation_windows(run, windows=-1)
