"""Fine-tune three ALBERT-base members on GLUE MRPC: deep ensemble, SAM or SharpBalance (paper App. F.2, Table 5).

    python recipes/albert_mrpc.py recipes/configs/albert_mrpc_sharpbalance.yaml
    accelerate launch recipes/albert_mrpc.py recipes/configs/albert_mrpc_sam.yaml
    python recipes/albert_mrpc.py recipes/configs/albert_mrpc_sharpbalance.yaml --dataset_name ../shared/data/glue-mrpc/mrpc
    python recipes/albert_mrpc.py --tiny true ...      # tiny random ALBERT + a word-level tokenizer built offline

Any ``--model_name_or_path`` with a sequence-classification head works (e.g. a local BERT folder).
Each member loads the same pretrained encoder with its own random classifier head, data order and
dropout. Accuracy and F1 of the ensemble on the validation set come from ``evaluate.load("glue",
"mrpc")`` when the Hub is reachable, otherwise from the same formulas in scikit-learn (the log and
``results["glue_metric_source"]`` say which); the ensemble metrics of `sbtrainer.metrics` come beside them.
The paper says the setup follows App. D.3 but gives no fine-tuning values for ALBERT; the optimiser
and schedule in the YAML are the usual ALBERT/GLUE ones and ours.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from recipe_utils import (
    CommonArgs,
    RecipeError,
    check_resume,
    headline,
    log_subset,
    member_sharpness,
    parse_args,
    phase,
    random_subset,
    run_script,
    save_ensemble,
    scoring_summary,
    setup_logging,
    start_run,
    write_report,
)
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.ensemble import reduce_member_logits
from sbtrainer.metrics import make_compute_metrics

logger = logging.getLogger("sbtrainer.recipes.albert_mrpc")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class MrpcArgs(CommonArgs):
    model_name_or_path: str = field(default="albert/albert-base-v2", metadata={
        "help": "Hub id or local folder of a model with a sequence-classification head (paper: ALBERT-base)."})
    dataset_name: str = field(default="nyu-mll/glue", metadata={
        "help": "Hub id (nyu-mll/glue) or a local folder laid out like its 'mrpc' configuration."})
    dataset_config_name: str | None = field(default="mrpc", metadata={"help": "Configuration (ignored for a folder)."})
    max_seq_length: int = field(default=128, metadata={"help": "Pairs are truncated to this many tokens."})
    pad_to_max_length: bool = field(default=False, metadata={
        "help": "Pad every pair to max_seq_length (fixed shapes, e.g. for torch_compile); by default each batch is "
                "padded to its longest pair (DataCollatorWithPadding), the same logits at a fraction of the cost."})
    tiny: bool = field(default=False, metadata={
        "help": "Tests/offline: a tiny random ALBERT and a word-level tokenizer built from the training text."})
    model_config_overrides: str | None = field(default=None, metadata={
        "help": "'k=v,k=v' applied to the model config (e.g. 'hidden_dropout_prob=0.0' or, with --tiny, sizes)."})


# ----------------------------------------------------------------------------- data, tokenizer, model


MRPC_COLUMNS = ("sentence1", "sentence2", "label")


def load_mrpc(args: MrpcArgs) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """MRPC train and validation splits (columns sentence1, sentence2, label), and their row and class counts.

    ``--max_train_samples``/``--max_eval_samples`` rows are drawn at random with ``--subset_seed``
    (`random_subset`), not the first rows.

    Raises:
        RecipeError: a missing local folder, split or column, naming ``--dataset_name`` and what it needs.
    """
    local = os.path.isdir(args.dataset_name)
    if not local and args.dataset_name.startswith((".", "/", "~")):
        raise RecipeError(f"--dataset_name {args.dataset_name}: no such folder; pass nyu-mll/glue or a folder laid "
                          f"out like its 'mrpc' configuration")
    raw = datasets.load_dataset(args.dataset_name, None if local else args.dataset_config_name)
    if not {"train", "validation"} <= set(raw):
        raise RecipeError(f"--dataset_name {args.dataset_name} has splits {list(raw)}; MRPC needs 'train' and "
                          f"'validation'")
    train, valid = raw["train"], raw["validation"]
    for name, split in (("train", train), ("validation", valid)):
        missing = [c for c in MRPC_COLUMNS if c not in split.column_names]
        if missing:
            raise RecipeError(f"--dataset_name {args.dataset_name}: the {name} split has no column {missing} "
                              f"(columns: {split.column_names}); MRPC needs {list(MRPC_COLUMNS)}")
    n_train, n_valid = len(train), len(valid)
    train = random_subset(train, args.max_train_samples, args.subset_seed, "--max_train_samples")
    valid = random_subset(valid, args.max_eval_samples, args.subset_seed, "--max_eval_samples")
    subsets = {**log_subset("train", train, "label", n_train), **log_subset("test", valid, "label", n_valid)}
    return datasets.DatasetDict(train=train, validation=valid), subsets


def tiny_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A lower-cased word-level ``PreTrainedTokenizerFast`` with BERT-style pair templates, built offline from ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_albert_config(vocab_size: int, max_len: int, pad_id: int):
    from transformers import AlbertConfig

    return AlbertConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=max_len, num_labels=2,
                        pad_token_id=pad_id)


def tokenizer_and_factory(args: MrpcArgs, train: datasets.Dataset):
    """The tokenizer and a member factory ``seed -> model`` (pretrained encoder + fresh head, or tiny random)."""
    if args.tiny:
        tokenizer = tiny_tokenizer(list(train["sentence1"]) + list(train["sentence2"]))
        config = tiny_albert_config(len(tokenizer), args.max_seq_length, tokenizer.pad_token_id)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=2)
    if args.model_config_overrides:
        try:
            config.update_from_string(args.model_config_overrides)
        except ValueError as err:
            raise RecipeError(f"--model_config_overrides {args.model_config_overrides!r}: {err}; write 'key=value' "
                              f"pairs separated by commas, with keys of {type(config).__name__}") from None
    if args.tiny:
        from transformers import AlbertForSequenceClassification

        return tokenizer, lambda _seed: AlbertForSequenceClassification(config)
    return tokenizer, lambda _seed: AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path,
                                                                                       config=config)


def tokenize(raw: datasets.DatasetDict, tokenizer, max_len: int, pad_to_max_length: bool) -> datasets.DatasetDict:
    """Sentence pairs -> input_ids, attention_mask, token_type_ids (truncated to ``max_len`` tokens; padded to
    it if ``pad_to_max_length``, else left unpadded for `collator`) and labels."""

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_len,
                        padding="max_length" if pad_to_max_length else False)
        return {**enc, "labels": batch["label"]}

    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names)


def collator(tokenizer, pad_to_max_length: bool):
    """``default_data_collator`` for rows padded at tokenization, else ``DataCollatorWithPadding`` (each batch
    padded to its longest pair; the attention mask hides the padding, so logits and gradients are unchanged)."""
    if pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer)


# ----------------------------------------------------------------------------- metrics


def glue_metric() -> tuple[Any, str]:
    """``(compute(predictions, references) -> {"accuracy", "f1"}, source)``: GLUE's metric, or sklearn offline."""
    try:
        import evaluate

        metric = evaluate.load("glue", "mrpc")
        return metric.compute, "evaluate"
    except Exception as err:  # offline or Hub unreachable: evaluate cannot fetch the metric script
        logger.warning("evaluate.load('glue', 'mrpc') failed (%s: %s); computing accuracy and F1 with scikit-learn",
                       type(err).__name__, str(err).splitlines()[0][:120])
    from sklearn.metrics import accuracy_score, f1_score

    def compute(predictions, references) -> dict[str, float]:
        return {"accuracy": float(accuracy_score(references, predictions)),
                "f1": float(f1_score(references, predictions))}

    return compute, "sklearn"


def compute_metrics_with_glue(reduction: str, glue_compute):
    """sbtrainer's ensemble metrics plus ``glue_accuracy``/``glue_f1`` of the ensemble and ``glue_member_f1``."""
    base = make_compute_metrics(reduction=reduction)

    def compute(eval_pred) -> dict[str, float]:
        out = base(eval_pred)
        preds = eval_pred.predictions
        member_logits = next(p for p in preds if np.ndim(p) == 3) if isinstance(preds, (tuple, list)) else preds
        import torch

        logits = reduce_member_logits(torch.as_tensor(member_logits), reduction)
        labels = np.asarray(eval_pred.label_ids)
        glue = glue_compute(predictions=logits.argmax(-1).numpy(), references=labels)
        out.update({f"glue_{k}": float(v) for k, v in glue.items()})
        member_f1 = [glue_compute(predictions=member_logits[:, i].argmax(-1), references=labels)["f1"]
                     for i in range(member_logits.shape[1])]
        out["glue_member_f1"] = float(np.mean(member_f1))
        return out

    return compute


# ----------------------------------------------------------------------------- the recipe


def main() -> dict[str, Any]:
    args, config = parse_args(MrpcArgs)
    setup_logging(config)
    facts = start_run(args, config)
    set_seed(config.seed)

    raw, subsets = load_mrpc(args)
    with phase("building the tokenizer and tokenizing"):
        tokenizer, factory = tokenizer_and_factory(args, raw["train"])
        data = tokenize(raw, tokenizer, args.max_seq_length, args.pad_to_max_length)
        data_collator = collator(tokenizer, args.pad_to_max_length)

    ensemble = EnsembleModel.from_factory(factory, config.num_members, config.member_seeds,
                                          reduction=config.ensemble_reduction, input_name="input_ids")
    check_resume(ensemble, config)
    glue_compute, source = glue_metric()
    logger.info("MRPC accuracy/F1 computed with %s", "evaluate.load('glue', 'mrpc')" if source == "evaluate" else "sklearn")
    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=data["train"],
                                  eval_dataset=data["validation"], data_collator=data_collator,
                                  compute_metrics=compute_metrics_with_glue(config.ensemble_reduction, glue_compute))
    results: dict[str, Any] = {"method": config.ensemble_method, "dataset": args.dataset_name,
                               "model": "tiny-albert" if args.tiny else args.model_name_or_path,
                               "glue_metric_source": source, **facts, **subsets}
    with phase(f"training {config.num_members} members ({config.ensemble_method})"):
        results.update(trainer.train(resume_from_checkpoint=config.resume_from_checkpoint).metrics)
    results.update(scoring_summary(trainer))
    with phase("evaluating on the validation set"):
        results.update(trainer.evaluate())

    if trainer.is_world_process_zero():
        results.update(member_sharpness(trainer.ensemble, data["train"], args, disable_tqdm=config.disable_tqdm,
                                        collate_fn=data_collator))
        with phase(f"writing the report and the ensemble to {config.output_dir}"):
            write_report(results, config.output_dir, config.ensemble_method)
            metrics = {**headline(results, ["eval"]), "eval_glue_accuracy": results["eval_glue_accuracy"],
                       "eval_glue_f1": results["eval_glue_f1"]}
            base = None if args.tiny else args.model_name_or_path
            save_ensemble(trainer.ensemble, args, config, metrics, base_model=base, processor=tokenizer)
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_script(main)
