"""Instruction fine-tuning of LLaVA on a manifest (the paper's "Training Setup"), under accelerate.

Paper defaults: lr 2e-5, batch 16, 10 epochs, frozen vision encoder, projector + language model
trained, the best epoch chosen on validation. Where the paper is silent we follow LLaVA-1.5's
fine-tuning recipe: AdamW without weight decay, cosine schedule with 3 % linear warm-up,
gradient clipping at 1.0; LoRA runs default to lr 2e-4 (LLaVA-1.5's LoRA recipe).

- The effective batch is ``global_batch_size`` (16, the paper's), whatever the number of
  processes launched: gradient accumulation is derived as ``global / (batch_size x processes)``
  (4 x 4 on one device, 2 x 1 on 8 GPUs); a global batch the launch cannot divide is refused
  (:func:`accumulation_steps`), so ``accelerate launch`` on more GPUs never silently grows the
  batch and resizes the schedule. The run's ``config.json`` records the batch actually used.
- Each epoch is a fixed permutation of the training posts (seeded by seed and epoch) cut
  into micro-batches dealt round-robin to the processes; every process gets the same number
  of micro-batches, a multiple of ``grad_accum`` (the last few posts of the permutation are
  followed by the first ones to fill the last step), so no accumulation spills over an
  epoch and a resumed run sees exactly the batches an uninterrupted one would.
- After every epoch: the run's decoding (label scoring, or generation with ``decode: generate``)
  on val (sharded over the processes), weighted F1; the
  best epoch's trainable weights go to ``model.safetensors`` (projector + language model,
  or projector + LoRA adapters), its metrics to ``metrics-val.json`` and its predictions to
  ``predictions-val.jsonl``; ``history.json`` has every epoch's loss and val scores (the run
  format of :mod:`sentilens.runs`, shared with the fusion family).
- ``--resume`` continues after the last finished epoch from ``RUN/resume/`` (trainable
  weights, AdamW moments, schedule), all safetensors + JSON; the folder is deleted
  when training ends. DeepSpeed shards the optimizer state, so resuming is refused there.
- One process, multi-GPU DDP, and DeepSpeed ZeRO-2/3 through ``accelerate launch`` and the
  configs in ``configs/``; multi-process also runs on CPU (gloo). Only the main process writes
  files and draws progress bars.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sentilens.data.records import Post, read_labels, read_split
from sentilens.distributed import predict_sharded, process_state
from sentilens.errors import SentilensError
from sentilens.metrics import classification_metrics
from sentilens.mllm.config import EvalPrecision, MllmRunConfig, load_run_config
from sentilens.mllm.families import TINY, family_of, get_family, parse_tiny
from sentilens.mllm.inputs import make_batch
from sentilens.mllm.model import (
    LoraSettings,
    MllmModel,
    Mode,
    TinySpec,
    num_image_tokens,
    prepare_model,
)
from sentilens.mllm.prompt import (
    PromptBuilder,
    PromptSettings,
    Task,
    default_max_length,
    infer_task,
    resolved_settings,
)
from sentilens.mllm.scoring import Decode, predict_posts
from sentilens.mllm.token_dropout import TokenDropout
from sentilens.mllm.tower import TowerRecipe
from sentilens.recipes import read_recipe, with_options
from sentilens.runs import (
    CONFIG,
    MODEL_WEIGHTS,
    check_resumable,
    clear_training_state,
    holds_trained_run,
    load_config,
    load_history,
    load_training_state,
    save_config,
    save_history,
    save_metrics,
    save_predictions,
    save_training_state,
    save_weights,
)
from sentilens.training_log import TrainingLog, check_tracker
from sentilens.validation import check_training_labels, memory_problem, pydantic_error

BASE_DIR = "base-model"
TOWER_REPORT = "vision_pretraining.json"


class MllmTrainConfig(BaseModel):
    """Everything ``sentilens train mllm`` takes (CLI options, or a YAML recipe under ``configs/``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: Path
    out: Path
    base_model: str = Field(TINY, description="HF id, local folder, or 'tiny:<family>' ('tiny' = 'tiny:llava')")
    mode: Mode = "full"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    epochs: int = Field(10, gt=0, le=100_000)
    lr: float | None = Field(None, gt=0, description="None: 2e-5 for full fine-tuning, 2e-4 for (Q)LoRA")
    batch_size: int = Field(4, gt=0, le=4096, description="posts per device per micro-batch")
    global_batch_size: int = Field(16, gt=0, le=1 << 20, description="posts per optimizer step over all processes "
                                   "(the paper: 16); gradient accumulation is derived from it")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    task: Task | None = Field(None, description="None: inferred from the labels")
    system: str | None = None
    question: str | None = None
    chat_template: str | None = Field(None, description="Jinja chat template the prompts are rendered with; None: "
                                                        "the checkpoint's own, else its model family's")
    label_list: bool = Field(True, description="append the label words to the question (False: the paper's "
                                               "bare question of Table 1)")
    decode: Decode = Field("score", description="how the run predicts, on val and after: score (one pass over "
                                                "every label's answer) or generate (greedy, parsed: the paper)")
    max_length: int | None = Field(None, gt=0, le=1 << 17, description="tokens per post, visual tokens included; "
                                   "None: 2048, more for a model whose images take most of it (default_max_length)")
    eval_batch_size: int = Field(8, gt=0, le=4096)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast in training and in every evaluation (val, test, serving); auto: bf16 on "
                            "CUDA, none on CPU")
    train_keep_ratio: float | None = Field(None, gt=0, le=1, description="also filter visual tokens in training "
                                           "and on val (None: the paper, which filters at inference only)")
    token_dropout: float | None = Field(None, gt=0, lt=1, description="LLaVA-1.5: in training, half the images "
                                        "keep a uniformly random share in [R, 1] of their visual tokens "
                                        "(mllm.token_dropout; None: the paper, whole images)")
    tiny: TinySpec = Field(default_factory=TinySpec, description="shapes of --model tiny")
    tiny_vision: Literal["pretrained", "random"] | None = Field(
        None, description="--model tiny: pretrain its vision tower first (cached), or leave it random; None: "
                          "pretrained for the families with a CLIP tower (vlm, llava-next), random for the others")
    tiny_tower: TowerRecipe = Field(default_factory=TowerRecipe, description="how --model tiny pretrains its tower")
    cache: Path | None = Field(None, description="pretrained-tower cache (default ~/.cache/sentilens/towers)")
    image_aspect: Literal["pad", "crop"] | None = Field(
        None, description="pad (LLaVA-1.5's image_aspect_ratio=pad) or crop; None: pad for LLaVA-1.5 checkpoints "
                          "and 'tiny', crop (the processor's own behaviour) for any other checkpoint")
    seed: int = 0
    resume: bool = False
    log_with: Literal["tensorboard", "mlflow", "wandb"] | None = Field(
        None, description="also log the training curve to this tracker (sentilens.training_log)")

    @model_validator(mode="after")
    def _tiny_fits(self) -> MllmTrainConfig:
        # --model tiny is built in this process and its tower pretrained on a corpus held whole in memory:
        # both are sized here, before a byte is allocated (float32 weights with gradients and AdamW moments).
        if not self.base_model.startswith("tiny"):
            return self
        s, t = self.tiny, self.tiny_tower
        corpus = (t.images + t.held_out) * 3 * s.image_size ** 2
        params = (12 * (s.vision_layers * s.vision_hidden ** 2 + s.text_layers * s.text_hidden ** 2)
                  + 2 * s.vocab_size * s.text_hidden + (s.image_size // s.patch_size) ** 2 * s.vision_hidden)
        problem = memory_problem(corpus + 16 * params, f"the tiny model ({params / 1e6:.0f} million parameters, a "
                                                       f"{t.images + t.held_out}-image tower corpus)")
        if problem:
            raise ValueError(problem)
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.mode == "full" else 2e-4)



LLAVA15_NAME = re.compile(r"llava[-_]?v?1[._]5", re.IGNORECASE)


def default_image_aspect(base_model: str) -> str:
    """``pad`` for LLaVA-1.5 checkpoints (trained and evaluated with ``image_aspect_ratio=pad``) and for
    ``tiny`` (which stands in for them); for ``tiny:<family>`` its family's default; ``crop`` for other
    checkpoints, whose processors were made for cropping (or fit the image themselves)."""
    tiny = parse_tiny(base_model)
    if tiny is not None:
        return get_family(tiny).default_image_aspect
    return "pad" if LLAVA15_NAME.search(base_model) else "crop"


def mllm_train_config(options: dict, recipe: str | Path | None = None) -> MllmTrainConfig:
    """Recipe values overridden by the options given on the command line (None = not given).

    With ``resume``, the run's saved options come first, so only what is given again is compared.
    """
    merged = read_recipe(recipe) if recipe else {}
    out = options.get("out")
    if options.get("resume") and out is not None and (Path(out) / "config.json").is_file():
        merged.update(load_config(out).get("training", {}))
    merged = with_options(merged, options)
    try:
        return MllmTrainConfig(**merged)
    except ValidationError as err:
        raise pydantic_error(err, recipe, what="option ") from None


def accumulation_steps(global_batch_size: int, batch_size: int, world: int) -> int:
    """Micro-batches per optimizer step so that ``batch_size x world x steps = global_batch_size``."""
    per_pass = batch_size * world
    if global_batch_size % per_pass:
        raise SentilensError(f"global_batch_size {global_batch_size} is not a multiple of batch_size {batch_size} x "
                             f"{world} process(es) = {per_pass}: change --batch-size or --global-batch-size")
    return global_batch_size // per_pass


def lora_base_dtype(mode: Mode, mixed_precision: str) -> torch.dtype | None:
    """The frozen base's dtype: (Q)LoRA under bf16 autocast holds it in bf16 on any device, as on CUDA, so weights
    that never train get no float32 copy (half the memory) and a CPU with bf16 matrix units runs them at its bf16
    speed; the adapters stay float32. None: ``prepare_model``'s rule."""
    return torch.bfloat16 if mode != "full" and mixed_precision == "bf16" else None


def evaluation_precision(model: MllmModel, mixed_precision: str, deepspeed: bool) -> dict:
    """The numerics validation runs in, saved in the run so that test and serving run in the same.

    ``weights``: the dtype of the language model's weights as training holds them (float32 master
    weights under plain autocast; DeepSpeed's bf16 mode keeps bf16 weights; LoRA a bf16 base);
    ``autocast``: the dtype ``torch.autocast`` runs in, or None. The predictor loads the weights in
    that dtype and predicts under the same autocast, so the best epoch is chosen under the numerics
    it is then used with.
    """
    weights = model.vlm.lm_head.weight.dtype
    if deepspeed and mixed_precision == "bf16":
        weights = torch.bfloat16
    autocast = "bfloat16" if mixed_precision == "bf16" else None
    return {"weights": str(weights).removeprefix("torch."), "autocast": autocast}


def epoch_batches(n: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """This process's micro-batches (indices into the training posts) for one epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_process = math.ceil(math.ceil(n / batch_size) / world)
    per_process = math.ceil(per_process / grad_accum) * grad_accum
    total = per_process * world * batch_size
    order = [order[i % n] for i in range(total)]
    batches = [order[i:i + batch_size] for i in range(0, total, batch_size)]
    return batches[rank::world]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to 0."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)


def train_mllm(cfg: MllmTrainConfig) -> dict:
    """Fine-tune, keep the best epoch by validation weighted F1; returns a summary of the run."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tiny = parse_tiny(cfg.base_model)  # an unknown tiny:<family> is refused before anything is written
    check_tracker(cfg.log_with)
    if cfg.token_dropout is not None and cfg.train_keep_ratio is not None:
        raise SentilensError("give --token-dropout or --train-keep-ratio, not both")
    if cfg.image_aspect is None:
        cfg = cfg.model_copy(update={"image_aspect": default_image_aspect(cfg.base_model)})
    labels = read_labels(cfg.data)
    train_posts, val_posts = read_split(cfg.data, "train"), read_split(cfg.data, "val")
    _check_labelled(train_posts, cfg.data / "train.jsonl", required=True)
    _check_labelled(val_posts, cfg.data / "val.jsonl", required=False)
    check_training_labels(labels, [p.label for p in train_posts], cfg.data / "train.jsonl")
    out = cfg.out
    _check_run_dir(out, cfg)

    state = process_state()
    cuda = state.device.type == "cuda"
    grad_accum = accumulation_steps(cfg.global_batch_size, cfg.batch_size, state.num_processes)
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed, cpu=not cuda)
    main = accelerator.is_main_process  # the only process that writes files (progress bars: sentilens.progress)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed and cfg.resume:
        raise SentilensError("--resume is not available under DeepSpeed (its optimizer state is sharded)")
    set_seed(cfg.seed)

    base = _base_model(cfg, out, train_posts, accelerator)
    model = prepare_model(base, cfg.mode, cfg.lora, device=accelerator.device, training=True,
                          gradient_checkpointing=cfg.gradient_checkpointing, dtype=lora_base_dtype(cfg.mode, mixed))
    family = family_of(model.vlm)
    if cfg.train_keep_ratio is not None:
        model.reducer = family.make_reducer(model.vlm, cfg.train_keep_ratio)
    if cfg.token_dropout is not None:
        if family.name != "llava":
            raise SentilensError(f"--token-dropout is offered for LLaVA-1.5 only, not {family.name}")
        model.token_dropout = TokenDropout(cfg.token_dropout, cfg.seed)
    image_tokens = num_image_tokens(model.vlm, model.processor)
    if cfg.resume:
        # A resumed run keeps the prompt it started with, even one saved before prompts were recorded.
        settings = load_run_config(load_config(out), out / CONFIG).prompt
    else:
        settings = PromptSettings(task=cfg.task or infer_task(labels),
                                  max_length=cfg.max_length or default_max_length(image_tokens),
                                  image_aspect=cfg.image_aspect, label_list=cfg.label_list,
                                  **{k: v for k, v in (("system", cfg.system), ("question", cfg.question),
                                                       ("chat_template", cfg.chat_template)) if v})
    builder = PromptBuilder(model.processor, settings, labels, image_tokens, family=family)
    settings = resolved_settings(settings, builder.chat_template, saved=cfg.resume, answer_prefix=builder.answer_prefix)
    builder = PromptBuilder(model.processor, settings, labels, image_tokens, family=family)
    run_config = MllmRunConfig(
        base_model=BASE_DIR if tiny is not None else stored_source(cfg.base_model),
        model_family=family.name,
        mode=cfg.mode,
        lora=cfg.lora if cfg.mode != "full" else None,
        prompt=settings,
        labels=labels,
        weights=MODEL_WEIGHTS,
        num_image_tokens=builder.num_image_tokens,
        decode=cfg.decode,
        predict_batch_size=cfg.eval_batch_size,
        best_epoch=None,
        precision=EvalPrecision(**evaluation_precision(model, mixed, deepspeed)),
        batch={"global": cfg.global_batch_size, "per_device": cfg.batch_size, "processes": accelerator.num_processes,
               "grad_accum": grad_accum},
        training=cfg.model_dump(mode="json"),
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(epoch_batches(len(train_posts), cfg.batch_size, grad_accum, world, rank, cfg.seed, 0))
    steps_per_epoch //= grad_accum
    scheduler = cosine_with_warmup(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio)

    history: list[dict] = []
    best: dict | None = None
    start_epoch = 0
    if cfg.resume:
        start_epoch, history, best, run_config.best_epoch = _load_resume(out, model, optimizer, scheduler)
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(out, run_config)
    if deepspeed:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    core: MllmModel = accelerator.unwrap_model(model)

    log = TrainingLog(out, history, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, log_with=cfg.log_with,
                      title=f"fine-tuning {out.name}", config=cfg.model_dump(mode="json"), main=main)
    for epoch in log.over(range(start_epoch, cfg.epochs)):
        started = time.perf_counter()
        loss = _train_epoch(accelerator, model, optimizer, scheduler, builder, train_posts, cfg, grad_accum, log,
                            epoch)
        core.eval()
        predictions = predict_sharded(
            lambda posts: predict_posts(core.vlm, builder, posts, cfg.eval_batch_size, reducer=core.reducer,
                                        decode=cfg.decode, autocast=run_config.precision.autocast,
                                        description="val"),
            val_posts)
        core.train()
        record = {"epoch": epoch + 1, "train_loss": loss, "seconds": round(time.perf_counter() - started, 2)}
        metrics = None
        if val_posts:
            metrics = classification_metrics([p.label for p in val_posts], [p.label for p in predictions], labels)
            record["val"] = {k: metrics[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
        log.epoch(record)
        improved = metrics is None or best is None or metrics["weighted_f1"] > best["weighted_f1"]
        if improved:
            best = metrics
            run_config.best_epoch = epoch + 1
        keep_resume = not deepspeed and epoch + 1 < cfg.epochs
        state_dict = _trainable_state(accelerator, model) if improved or keep_resume else None
        if main:
            if improved:
                save_weights(out / MODEL_WEIGHTS, state_dict)
                if metrics is not None:
                    save_metrics(out, "val", metrics)
                    save_predictions(out, "val", [p.id for p in val_posts], predictions)
                save_config(out, run_config)
            save_history(out, history)
            if keep_resume:
                _save_resume(out, state_dict, optimizer, scheduler, epoch + 1, best, run_config)
        accelerator.wait_for_everyone()
    if main:
        clear_training_state(out)
    accelerator.wait_for_everyone()
    return {"run": str(out), "best_epoch": run_config.best_epoch, "val": best, "history": history}


def _train_epoch(accelerator, model, optimizer, scheduler, builder: PromptBuilder, posts: list[Post],
                 cfg: MllmTrainConfig, grad_accum: int, log: TrainingLog, epoch: int) -> float:
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = epoch_batches(len(posts), cfg.batch_size, grad_accum, world, rank, cfg.seed, epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    dropout = accelerator.unwrap_model(model).token_dropout
    if dropout is not None:
        dropout.start_epoch(epoch, rank)
    model.train()
    total, count, window = 0.0, 0, []
    for indices in batches:
        batch = make_batch(builder, [posts[i] for i in indices], with_targets=True).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = model(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used, before the schedule moves on
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        window.append(loss.item())
        total, count = total + window[-1], count + 1
        if accelerator.sync_gradients:
            log.step(sum(window) / len(window), lr)  # this process's mean loss over the accumulated micro-batches
            window = []
    mean = torch.tensor([total / max(count, 1)], device=accelerator.device)
    return float(accelerator.reduce(mean, reduction="mean").item())


def _check_labelled(posts: list[Post], path: Path, required: bool) -> None:
    if required and not posts:
        raise SentilensError("no training posts", path)
    missing = [p.id for p in posts if p.label is None]
    if missing:
        raise SentilensError(f"{len(missing)} posts have no label (first: {missing[0]})", path)


def _check_run_dir(out: Path, cfg: MllmTrainConfig) -> None:
    if cfg.resume:
        check_resumable(out)
        saved = load_config(out)["training"]
        for key in ("base_model", "mode", "data", "batch_size", "global_batch_size", "epochs", "seed"):
            now, then = getattr(cfg, key), saved.get(key)
            if key == "data":
                now, then = Path(now).resolve(), Path(then).resolve()
            if str(now) != str(then):
                raise SentilensError(f"--resume with a different {key} ({now}, the run has {then})", out)
    elif holds_trained_run(out):
        raise SentilensError("already a run directory: pick another --out, or --resume", out)


def stored_source(source: str) -> str:
    """A local checkpoint folder is stored as an absolute path, an HF id as it is."""
    path = Path(source)
    return str(path.resolve()) if path.exists() else source


def _base_model(cfg: MllmTrainConfig, out: Path, posts: list[Post], accelerator) -> str:
    """The checkpoint to fine-tune; ``tiny:<family>`` is built inside the run directory so the run is
    self-contained.

    Its vision tower is pretrained first (:mod:`sentilens.mllm.tower`, cached across runs) where the
    family's tower is a CLIP ViT, unless ``tiny_vision`` is ``random``; the tower's pretraining report
    is kept beside the checkpoint.
    """
    tiny = parse_tiny(cfg.base_model)
    if tiny is None:
        return cfg.base_model
    family = get_family(tiny)
    pretrain = cfg.tiny_vision == "pretrained" or (cfg.tiny_vision is None and family.pretrains_tower)
    if pretrain and not family.pretrains_tower:
        raise SentilensError(f"--tiny-vision pretrained: the tiny {tiny} model's tower cannot be pretrained here "
                             "(only the CLIP towers of tiny:llava and tiny:llava-next); use --tiny-vision random")
    folder = out / BASE_DIR
    if accelerator.is_main_process and not (folder / "config.json").is_file():
        tower = None
        if pretrain:
            from sentilens.mllm.tower import REPORT, pretrained_tower

            tower = pretrained_tower(cfg.tiny, cfg.tiny_tower, cfg.cache)
        family.build_tiny(folder, corpus=[p.text for p in posts], seed=cfg.seed, spec=cfg.tiny, vision_tower=tower)
        if tower is not None:
            shutil.copyfile(tower / REPORT, folder / TOWER_REPORT)
    accelerator.wait_for_everyone()
    return str(folder)


def _trainable_state(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Trainable tensors by name on the main process (gathered from all processes under ZeRO-3)."""
    core: MllmModel = accelerator.unwrap_model(model)
    names = set(core.trainable_state())
    if accelerator.state.deepspeed_plugin is not None:
        full = accelerator.get_state_dict(model)
        return None if full is None else {k[len("net."):]: v for k, v in full.items() if k[len("net."):] in names}
    return core.trainable_state() if accelerator.is_main_process else None


def _save_resume(out: Path, trainable: dict, optimizer, scheduler, epochs_done: int, best: dict | None,
                 run_config: MllmRunConfig) -> None:
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "_lr_lambdas"}
    save_training_state(out, trainable, optimizer.state_dict(),
                        {"epochs_done": epochs_done, "best": best, "best_epoch": run_config.best_epoch,
                         "scheduler": sched})


def _load_resume(out: Path, model: MllmModel, optimizer, scheduler) -> tuple[int, list, dict | None, int | None]:
    saved = load_training_state(out)
    model.load_trainable_state(saved.trainable, out / "resume")
    optimizer.load_state_dict(saved.optimizer)
    scheduler.load_state_dict({**saved.state["scheduler"], "_lr_lambdas": [None] * len(optimizer.param_groups)})
    state = saved.state
    return state["epochs_done"], load_history(out), state["best"], state["best_epoch"]
