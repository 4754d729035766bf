"""Fine-tune three ViT-T/16 members on CIFAR-100 at 224x224: deep ensemble, SAM or SharpBalance (paper App. F.2).

    python recipes/vit_cifar100.py recipes/configs/vit_cifar100_sharpbalance.yaml
    accelerate launch recipes/vit_cifar100.py recipes/configs/vit_cifar100_sam.yaml --cifar_c_dir data/CIFAR-100-C
    python recipes/vit_cifar100.py --pretrained false --image_size 32 --model_kwargs '{"depth": 1}' ...   # tiny

Each member starts from the same pretrained timm checkpoint (``vit_tiny_patch16_224``, downloaded from
the Hub) with its own randomly initialised 100-class head, and sees its own data order and
augmentation. CIFAR images are resized to ``--image_size`` (224), randomly cropped (padding size/8) and
flipped, and normalised with the checkpoint's mean/std. The paper (App. F.2, Table 5) reports ensemble
accuracy on CIFAR-100 and CIFAR-100-C and says the setup follows App. D.3; the fine-tuning schedule
(epochs, learning rate, warm-up, cosine decay) is ours and is in the YAML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cifar_data import (
    CifarDataArgs,
    cifar_transforms,
    corrupted_sets,
    evaluate_corrupted,
    load_cifar,
    ood_prefix,
    views,
)
from recipe_utils import (
    CommonArgs,
    RecipeError,
    check_resume,
    headline,
    member_sharpness,
    parse_args,
    phase,
    run_script,
    save_ensemble,
    scoring_summary,
    setup_logging,
    start_run,
    write_report,
)
from transformers import set_seed

from sbtrainer import EnsembleModel, SharpBalanceTrainer
from sbtrainer.models import timm_model


@dataclass
class VitArgs(CommonArgs, CifarDataArgs):
    dataset_name: str = field(default="uoft-cs/cifar100", metadata={
        "help": "Hub id or local folder of CIFAR-100 (columns img, fine_label)."})
    model_name: str = field(default="vit_tiny_patch16_224", metadata={"help": "timm architecture (ViT-T/16)."})
    pretrained: bool = field(default=True, metadata={
        "help": "Start from timm's pretrained weights (Hub download); false = random init (tests, offline)."})
    image_size: int = field(default=224, metadata={"help": "Input side: CIFAR images are resized to it (224)."})
    model_kwargs: str = field(default="{}", metadata={
        "help": 'JSON of extra timm.create_model kwargs, e.g. \'{"depth": 1, "embed_dim": 24, "num_heads": 2}\' (tiny runs).'})


def model_kwargs(text: str | Mapping[str, Any]) -> dict[str, Any]:
    """``--model_kwargs`` as a dict: JSON text (flags) or a mapping (a YAML file read alone).

    Raises:
        RecipeError: text that is not a JSON object, naming the option and the JSON error.
    """
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecipeError(f"--model_kwargs {text!r} is not JSON ({err.msg} at character {err.pos}); write it as "
                          f"'{{\"depth\": 1}}' (double quotes around keys and strings)") from None
    if not isinstance(value, dict):
        raise RecipeError(f"--model_kwargs must be a JSON object of timm.create_model keyword arguments, "
                          f"e.g. '{{\"depth\": 1}}'; got {text!r}")
    return value


def main() -> dict[str, Any]:
    args, config = parse_args(VitArgs)
    config.remove_unused_columns = False  # the transforms read the raw image column
    setup_logging(config)
    facts = start_run(args, config)
    set_seed(config.seed)

    extra = model_kwargs(args.model_kwargs)
    data = load_cifar(args, args.max_train_samples, args.max_eval_samples, seed=args.subset_seed)
    kwargs = {"num_classes": data["num_classes"], "img_size": args.image_size, **extra}
    ensemble = EnsembleModel.from_factory(lambda _seed: timm_model(args.model_name, pretrained=args.pretrained, **kwargs),
                                          config.num_members, config.member_seeds, reduction=config.ensemble_reduction)
    check_resume(ensemble, config)
    pretrained_cfg = ensemble.members[0].pretrained_cfg
    train_tf, eval_tf = cifar_transforms(data["num_classes"], args.image_size, pretrained_cfg["mean"], pretrained_cfg["std"])
    train, score, test = views(data, train_tf, eval_tf)

    trainer = SharpBalanceTrainer(model=ensemble, args=config, train_dataset=train, eval_dataset=test,
                                  score_dataset=score)
    results: dict[str, Any] = {"method": config.ensemble_method, "dataset": args.dataset_name,
                               "model": args.model_name, "pretrained": args.pretrained, **facts, **data["subsets"]}
    with phase(f"training {config.num_members} members ({config.ensemble_method})"):
        results.update(trainer.train(resume_from_checkpoint=config.resume_from_checkpoint).metrics)
    results.update(scoring_summary(trainer))

    with phase("evaluating on the test set"):
        results.update(trainer.evaluate())
    prefix = ood_prefix(data["num_classes"])
    sets, corrupt_facts = corrupted_sets(args, data, args.subset_seed, progress=not config.disable_tqdm)
    results.update(corrupt_facts)
    if sets is not None:
        results.update(evaluate_corrupted(trainer, eval_tf, data, sets, prefix))

    if trainer.is_world_process_zero():
        results.update(member_sharpness(trainer.ensemble, score, args, disable_tqdm=config.disable_tqdm))
        with phase(f"writing the report and the ensemble to {config.output_dir}"):
            write_report(results, config.output_dir, config.ensemble_method, ood_prefix=prefix)
            base = pretrained_cfg.get("hf_hub_id") if args.pretrained else None
            save_ensemble(trainer.ensemble, args, config, headline(results, ["eval", f"{prefix}_all"]), base_model=base)
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    run_script(main)
