"""The functions and the task class that taugpt_val_loss.yaml names (lm-eval imports this file by its path)."""

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from tauformer_model.evaluate import EvaluationError, token_request, validation_windows


def dataset(pretrained=None, data=None, data_cache=None, windows=None, block_size=None, **other_metadata):
    """{"test": the run's validation windows}, one document per window. lm-eval calls this with the task's
    metadata, which holds the model_args (pretrained: the run) and whatever --metadata adds."""
    import datasets

    if pretrained is None:
        raise EvaluationError("the task taugpt_val_loss needs the run: model_args pretrained=RUN (lm-eval passes "
                              "the model_args to the task as metadata)")
    found = validation_windows(pretrained, data=data, data_cache=data_cache, windows=windows, block_size=block_size)
    return {"test": datasets.Dataset.from_list(found)}


def process_results(doc, results):
    """The window's loss in nats per token: minus its log-likelihood over its block_size targets (every window
    has as many, so the mean over windows is the mean over tokens, as the trainer's)."""
    (loglikelihood, _), = results
    return {"nats_per_token": -loglikelihood / (len(doc["tokens"]) - 1)}


class ValidationWindowsTask(ConfigurableTask):
    """A ConfigurableTask whose requests are token ids: the window's first token as the context, the other
    block_size as the continuation (TauGPTLM.loglikelihood scores them as given). The model's input is then
    exactly the trainer's window and the targets its shifted targets. Only the taugpt model reads token ids:
    lm-eval's other models take the texts, and refuse the third element of the arguments."""

    def __init__(self, config: dict):
        config = {k: v for k, v in config.items() if k != "class"}  # the YAML's route to this class, not a field
        super().__init__(config=config)

    def construct_requests(self, doc, ctx, **kwargs):
        kwargs.pop("apply_chat_template", None), kwargs.pop("chat_template", None)
        tokens = doc["tokens"]
        arguments = token_request(tokens[:1], tokens[1:], doc["context"], doc["continuation"])
        return Instance(request_type="loglikelihood", doc=doc, arguments=arguments, idx=0, **kwargs)
