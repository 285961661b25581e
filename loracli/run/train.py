"""The training recipe, top to bottom.

read the run folder → accelerator → models → data → optimizer and schedule → resume → metadata →
loop (prefetch → loss → backward → step → bookkeeping) → final save. `_train` lists the phases; each is
a function below it. The plan fixes every number (batches, steps, epochs, warmup, save points); this
file only carries it out, and stops if the data it builds does not match the plan.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loracli.captions import process_caption
from loracli.config.loader import read_toml
from loracli.config.schema import DatasetSection, LoracliConfig
from loracli.dataset.subsets import image_options
from loracli.errors import ConfigError, Interrupted, Problem, TrainingError
from loracli.family import FAMILIES, ModelFamily
from loracli.lint import trains_text_encoder
from loracli.network_blocks import BlockOptions, extra_network_args
from loracli.plan import Plan, load_plan
from loracli.run.compiled import StepTiming, compile_failure, compile_unet
from loracli.run.conditioning import Conditioner, TextCache, conditioner_for
from loracli.run.data import BucketBatches, ExampleLoader, caption_options, mask_source, original_size
from loracli.run.forward import DiffusionLoss
from loracli.run.fp8 import store_in_fp8
from loracli.run.global_draws import GlobalDraws
from loracli.run.latents import LatentCache
from loracli.run.metadata import build_metadata
from loracli.run.models import SDComponents, load_sd_components
from loracli.run.network import LoraPlus, NetworkSpec, create_network, load_network_weights, prepare_param_groups
from loracli.run.optim import adafactor_uses_relative_step, build_optimizer, build_scheduler, current_lrs
from loracli.run.outputs import RunOutputs, forget_after
from loracli.run.precision import allow_fp16_unscale, network_dtype
from loracli.run.prefetch import BatchPrefetcher, planned_jobs
from loracli.run.progress import TrainingProgress, loading_model_line, quiet_third_party, run_summary
from loracli.run.sampling import SampleMaker
from loracli.run.state import TrainState, load_latest_state, loader_rng_state
from loracli.run.step import enforce_zero_terminal_snr
from loracli.run.step_sync import average_gradients
from loracli.run.validation import Validator
from loracli.rundir import atomic_write_json
from loracli.sample_prompts import read_prompt_file
from loracli.schedule import final_file_name
from loracli.trackers import init_trackers, tracker_names

if TYPE_CHECKING:
    from accelerate import Accelerator

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_run(run_dir: Path) -> tuple[LoracliConfig, Plan]:
    config = LoracliConfig.model_validate(read_toml(run_dir / "config.resolved.toml"))
    return config, load_plan(run_dir / "plan.json")


def network_spec(config: LoracliConfig) -> NetworkSpec:
    net = config.network
    extra: dict[str, object] = {"train_norm": net.train_norm, "rank_dropout_scale": net.rank_dropout_scale}
    if net.algo == "lokr":
        extra["factor"] = net.factor
    if net.dora_wd:
        extra["dora_wd"] = True
    return NetworkSpec(
        algo=net.algo, dim=net.dim, alpha=net.alpha, conv_dim=net.conv_dim, conv_alpha=net.conv_alpha,
        dropout=net.network_dropout, rank_dropout=net.rank_dropout, module_dropout=net.module_dropout,
        use_tucker=net.use_tucker, use_scalar=net.use_scalar,
        train_unet=not net.network_train_text_encoder_only, train_text_encoder=not net.network_train_unet_only,
        extra_args=extra, preset=net.lycoris_preset, blocks=BlockOptions.of(net), network_alpha=net.network_alpha,
        loraplus=LoraPlus(net.loraplus_lr_ratio, net.loraplus_unet_lr_ratio, net.loraplus_text_encoder_lr_ratio),
    )


def network_args_metadata(config: LoracliConfig) -> dict[str, str] | None:
    """ss_network_args as sd-scripts records them: the --network_args strings."""
    net = config.network
    args: dict[str, str] = {}
    if net.module_name == "lycoris.kohya":
        args.update(algo=net.algo, preset=net.lycoris_preset)
        if net.conv_dim:
            args["conv_dim"] = str(net.conv_dim)
        if net.conv_alpha is not None:
            args["conv_alpha"] = f"{net.conv_alpha:g}"
        for key in ("use_tucker", "use_scalar", "train_norm", "rank_dropout_scale"):
            args[key] = str(getattr(net, key))
        if net.algo == "lokr":
            args["factor"] = str(net.factor)
    if net.rank_dropout:
        args["rank_dropout"] = str(net.rank_dropout)
    if net.module_dropout:
        args["module_dropout"] = str(net.module_dropout)
    args.update(extra_network_args(net))
    return args or None


def resolve_mixed_precision(requested: str, log) -> str:
    if requested == "fp16" and not torch.cuda.is_available():
        log("warning: fp16 mixed precision needs a CUDA GPU; training in fp32 on this CPU")
        return "no"
    return requested


class StatusFile:
    """status.json: what a script (or a person in the morning) reads to know how the run went."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.path = run_dir / "status.json"
        self.enabled = int(os.environ.get("RANK", "0")) == 0  # one writer: the main process
        # start_step: where this process began (a resumed run), so it/s counts only its own steps
        self.data = {"state": "running", "step": 0, "start_step": 0, "epoch": 0, "total_steps": total_steps,
                     "last_save": None, "error": None, "started_at": time.time(), "updated_at": time.time(),
                     "pid": os.getpid()}
        self.write()

    def write(self, **changes) -> None:
        self.data.update(changes, updated_at=time.time())
        if self.enabled:
            atomic_write_json(self.path, self.data)


class StopFlag:
    """The first Ctrl-C/SIGTERM asks the loop to save its state and stop after the current step;
    a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def train(run_dir: Path, resume: bool = False) -> Path:
    """Train the run described by run_dir (continuing from its last state with resume); returns the final file."""
    quiet_third_party()
    config, plan = read_run(run_dir)
    status = StatusFile(run_dir, plan.total_steps)
    stop = StopFlag()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    try:
        final = _train(run_dir, config, plan, status, stop, resume)
    except (KeyboardInterrupt, Interrupted) as exc:
        status.write(state="interrupted", error=str(exc) or "interrupted by a signal")
        raise
    except TrainingError as exc:
        status.write(state="failed", error=str(exc))
        raise
    except torch.OutOfMemoryError:
        message = out_of_memory_message(config)
        status.write(state="failed", error=message)
        raise TrainingError(message) from None
    except Exception as exc:
        failure = compile_failure(exc, config.training.dynamo_backend) if config.training.torch_compile else None
        if failure is not None:  # torch.compile could not build the UNet: one line naming the option
            status.write(state="failed", error=str(failure))
            raise failure from None
        try:
            status.write(state="failed", error=f"{type(exc).__name__}: {exc}")
        except OSError:  # a full disk must not replace the original error
            pass
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status.write(state="finished", finished_at=time.time())
    return final


def out_of_memory_message(config: LoracliConfig) -> str:
    """What to change, in the order that saves the most memory for the least quality."""
    tips = []
    if config.training.train_batch_size > 1:
        tips.append(f"lower training.train_batch_size (now {config.training.train_batch_size}; "
                    "raise gradient_accumulation_steps to keep the effective batch)")
    if not config.training.gradient_checkpointing:
        tips.append("set training.gradient_checkpointing = true")
    if not (config.dataset.cache_latents or config.dataset.cache_latents_to_disk):
        tips.append("set dataset.cache_latents = true")
    if config.training.mixed_precision == "no":
        tips.append('set training.mixed_precision = "bf16" (or "fp16")')
    tips.append(f"lower dataset.resolution (now {config.dataset.resolution}) or dataset.max_bucket_reso")
    return "out of GPU memory (CUDA out of memory); " + "; ".join(tips)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()



# --- what the phases hand each other -------------------------------------------------------------

@dataclass
class RunContext:
    """The run as read from its folder, and where it reports."""

    run_dir: Path
    config: LoracliConfig
    plan: Plan
    family: ModelFamily
    status: StatusFile
    stop: StopFlag
    progress: TrainingProgress

    def log(self, line: str) -> None:
        self.progress.log(line)


@dataclass
class Devices:
    accelerator: Accelerator
    mixed_precision: str  # the effective one (fp16 on a CPU falls back to "no")
    weight_dtype: torch.dtype  # the frozen base weights'
    trained_dtype: torch.dtype | None  # the network's under full_fp16 / full_bf16; None: fp32
    trackers: list[str]  # tensorboard / wandb, as logging.log_with and logging_dir say

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class Models:
    sd: SDComponents
    network: torch.nn.Module
    conditioner: Conditioner
    train_text_encoder: bool
    unet_after_cache: bool  # the UNet reaches the device once the latent cache is built


@dataclass
class Data:
    batches: BucketBatches  # the plan's bucket-batches, this process's share
    draws: GlobalDraws
    loader: ExampleLoader
    latent_cache: LatentCache | None
    text_cache: TextCache | None
    original_sizes: list[tuple[int, int]]  # SDXL's size conditioning, per planned image


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    optimizer_name: str
    relative_step: bool  # Adafactor's own schedule (its lr is then recorded as "adafactor:LR")
    params: list[torch.Tensor]
    state_bytes: int  # about what a training state needs on disk


@dataclass(frozen=True)
class Position:
    """Where the loop stands: what a state saved now would resume from."""

    step: int
    epoch: int  # 1-based
    batches_done: int  # of that epoch, on this process


# --- the recipe ------------------------------------------------------------------------------------

def _train(run_dir: Path, config: LoracliConfig, plan: Plan, status: StatusFile, stop: StopFlag,
           resume: bool) -> Path:
    main_process = int(os.environ.get("RANK", "0")) == 0
    progress = TrainingProgress(plan.total_steps, enabled=main_process, optimizer_type=config.optimizer.optimizer_type)
    run = RunContext(run_dir, config, plan, FAMILIES[plan.model_family], status, stop, progress)
    devices = _start_accelerator(run)
    models = _build_models(run, devices)
    # only the main process validates; built before the data (the latent cache moves the VAE off the device)
    validator = _validator(run, devices, models) if main_process else None
    data = _build_data(run, devices, models)
    optim = _build_optimizer(run, devices, models)
    start = _resume(run, devices, data) if resume else Position(0, 1, 0)
    if devices.accelerator.is_main_process and devices.trackers:
        init_trackers(devices.accelerator, config, plan, run_dir.name)
    outputs = _outputs(run, devices, models, optim, validator, start)
    loop = TrainingLoop(run, devices, models, data, optim, outputs, start)
    loop.train()
    return _finish(run, devices, outputs, loop)


def _start_accelerator(run: RunContext) -> Devices:
    """One process in-process, or one of N under accelerate launch; seeded as sd-scripts seeds."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    tr, plan = run.config.training, run.plan
    if "LOCAL_RANK" not in os.environ:
        AcceleratorState._reset_state(reset_partial_state=True)  # allow several runs in one process
    mixed_precision = resolve_mixed_precision(tr.mixed_precision, run.log)
    logging_dir = run.config.logging.logging_dir
    trackers = tracker_names(run.config)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes then use gloo (how multi-process is tested)
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_dir=str(logging_dir) if logging_dir else None,
    )
    if accelerator.num_processes != plan.num_processes:
        raise TrainingError(f"the plan is for {plan.num_processes} process(es) but {accelerator.num_processes} run")
    set_seed(tr.seed)
    trained_dtype = network_dtype(tr.full_fp16, tr.full_bf16, mixed_precision, run.log)
    if trained_dtype == torch.float16:
        allow_fp16_unscale(accelerator.scaler)  # the scaler refuses fp16 gradients otherwise
    return Devices(accelerator, mixed_precision, DTYPES[mixed_precision], trained_dtype, trackers)


def _build_models(run: RunContext, devices: Devices) -> Models:
    """Frozen base weights in the training dtype, the network in fp32 (or full_fp16 / full_bf16)."""
    config, tr, ds, net = run.config, run.config.training, run.config.dataset, run.config.network
    model_path = getattr(run.plan, "model_path", None)
    run.log(loading_model_line(config.model.pretrained_model_name_or_path, run.family.title, model_path))
    sd = load_sd_components(model_path or config.model.pretrained_model_name_or_path, config.model.v2,
                            sdxl=run.family.name == "sdxl", v_parameterization=config.model.v_parameterization,
                            allow_pickle=config.model.allow_pickle_checkpoint)
    if tr.xformers:
        _enable_xformers(sd.unet)
    network = create_network(network_spec(config), sd.text_encoders, sd.unet, sd.family)
    if net.network_weights is not None:
        load_network_weights(network, net.network_weights)
    train_te = trains_text_encoder(config, len(sd.text_encoders))
    # with cached latents the UNet reaches the device after the cache is built (the VAE pass has it to itself)
    unet_after_cache = ds.cache_latents or ds.cache_latents_to_disk
    _place_models(sd, network, devices.device, devices.weight_dtype, devices.mixed_precision, config,
                  unet_on_device=not unet_after_cache, network_dtype=devices.trained_dtype)
    if tr.gradient_checkpointing:
        _enable_gradient_checkpointing(sd, train_te)
    network.train()
    if tr.torch_compile:  # compiled at the first forward (and again per new bucket shape at first)
        compile_unet(sd.unet, tr.dynamo_backend)
    conditioner = conditioner_for(sd, ds.max_token_length, config.model.clip_skip, tr.weighted_captions)
    if tr.zero_terminal_snr:
        enforce_zero_terminal_snr(sd.noise_scheduler)
    return Models(sd, network, conditioner, train_te, unet_after_cache)


def _validator(run: RunContext, devices: Devices, models: Models) -> Validator | None:
    """The held-out images' latents, noise and timesteps, fixed now (the VAE may leave the device next)."""
    if not getattr(run.plan, "validation_images", None):
        return None
    return Validator(run.plan, run.config, models.sd, models.conditioner, run.family.latent_scaling_factor,
                     devices.device, _caches_text(run.config))


def _build_data(run: RunContext, devices: Devices, models: Models) -> Data:
    """The plan's bucket-batches (never recomputed: a mismatch stops the run), the caches and the loader."""
    config, plan, tr, accelerator = run.config, run.plan, run.config.training, devices.accelerator
    dataset_seed = random.Random(tr.seed).randint(0, 2**31)
    # each image trains with its subset's options ([[datasets]]), or [dataset]'s in the folder form
    per_image = image_options(config, plan.images)
    batches = BucketBatches(plan, tr.train_batch_size, dataset_seed, accelerator.process_index,
                            accelerator.num_processes)
    largest_batch = max([tr.train_batch_size] + [d.get("batch_size") or 0 for d in getattr(plan, "datasets", [])])
    draws = GlobalDraws(accelerator.process_index, accelerator.num_processes, largest_batch)
    if batches.total_batches() != plan.batches_per_epoch:
        raise TrainingError(f"the data gives {batches.total_batches()} batches per epoch but the plan says "
                            f"{plan.batches_per_epoch}; re-run `loracli plan` (did the dataset change?)")
    cache = _latent_cache(run, models.sd, per_image)
    if models.unet_after_cache:
        models.sd.unet.to(devices.device)
    loader = ExampleLoader(plan, config.dataset, plan.total_steps, load_pixels_=cache is None, seed=tr.seed + 1,
                           image_options=per_image)
    original_sizes = [original_size(im, o, cache is not None) for im, o in zip(plan.images, per_image)]
    text_cache = _text_cache(config, plan, models.conditioner, devices.device, run.log) \
        if _caches_text(config) else None
    if text_cache is not None and not plan.sample_rounds:
        for te in models.sd.text_encoders:  # frozen and no longer read: free the device (sd-scripts does too)
            te.to("cpu")
    return Data(batches, draws, loader, cache, text_cache, original_sizes)


def _latent_cache(run: RunContext, sd: SDComponents, per_image: list[DatasetSection]) -> LatentCache | None:
    """Every latent the plan needs, encoded once (cache_latents), then the VAE leaves the device."""
    ds, tr = run.config.dataset, run.config.training
    if not (ds.cache_latents or ds.cache_latents_to_disk):
        return None
    disk = _cache_dir() / "latents" if ds.cache_latents_to_disk else None
    cache = LatentCache(run.plan, [o.flip_aug for o in per_image], disk,
                        [mask_source(im, o) for im, o in zip(run.plan.images, per_image)])
    cache.fill(sd.vae, run.family.latent_scaling_factor, run.config.model.pretrained_model_name_or_path,
               ds.vae_batch_size, tr.seed)
    run.log(f"latents cached: {cache.encoded} encoded, {cache.count_needed() - cache.encoded} read from disk")
    sd.vae.to("cpu")  # no longer needed on the device
    return cache


def _build_optimizer(run: RunContext, devices: Devices, models: Models) -> Optimization:
    """sd-scripts' param groups (text encoder first, then UNet), the optimizer and the lr schedule."""
    opt, plan, accelerator = run.config.optimizer, run.plan, devices.accelerator
    groups = prepare_param_groups(models.network, opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    optimizer, optimizer_name = build_optimizer(opt.optimizer_type, groups, opt.learning_rate, opt.optimizer_args)
    relative_step = adafactor_uses_relative_step(opt.optimizer_type, opt.optimizer_args)
    scheduler_name = "adafactor" if relative_step else opt.lr_scheduler
    # The scheduler steps num_processes times per update (accelerate), hence the product.
    lr_scheduler = build_scheduler(scheduler_name, optimizer, plan.warmup_steps,
                                   plan.total_steps * plan.num_processes, opt.lr_scheduler_num_cycles,
                                   opt.lr_scheduler_power, opt.learning_rate if relative_step else None)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(models.network)  # its weights travel with the optimizer state
    params = [p for g in groups for p in g["params"]]
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in params)  # weights + optimizer moments + slack
    return Optimization(optimizer, lr_scheduler, optimizer_name, relative_step, params, state_bytes)


def _resume(run: RunContext, devices: Devices, data: Data) -> Position:
    """Weights, optimizer, schedule and RNG from the last complete state, and the position it was taken at."""
    state = load_latest_state(devices.accelerator, run.run_dir)
    if state is None:
        raise TrainingError(f"{run.run_dir} has no complete training state to resume from; start a new run "
                            "(set output.save_state_every_n_steps to save states regularly)")
    data.loader.rng.setstate(loader_rng_state(state))
    forget_after(run.run_dir, state.global_step)
    run.log(f"resuming at step {state.global_step} (epoch {state.epoch}, {state.batches_done} batches done)")
    run.status.write(step=state.global_step, start_step=state.global_step, epoch=state.epoch)
    run.progress.progress.update(run.progress.task, completed=state.global_step)
    return Position(state.global_step, state.epoch, state.batches_done)


def _outputs(run: RunContext, devices: Devices, models: Models, optim: Optimization, validator: Validator | None,
             start: Position) -> RunOutputs:
    """What every saved file carries, the sample maker (main process, when the plan has rounds) and the
    handle the loop writes through."""
    config, opt, tr = run.config, run.config.optimizer, run.config.training
    base_metadata = build_metadata(
        # session_id from its own RNG, so the seeded stream (and a resumed run) is untouched
        config, run.plan, run.family, session_id=random.Random().randint(0, 2**32), training_started_at=time.time(),
        optimizer_name=optim.optimizer_name,
        lr_scheduler_name=f"adafactor:{opt.learning_rate}" if optim.relative_step else opt.lr_scheduler,
        learning_rate_recorded=None if optim.relative_step else opt.learning_rate,
        network_args=network_args_metadata(config), config_hash=run.plan.config_hash,
        mixed_precision=devices.mixed_precision,  # the effective one
    )
    sampler = None
    if run.plan.sample_rounds and devices.accelerator.is_main_process:
        sampler = SampleMaker(models.sd, models.conditioner, read_prompt_file(config.sample.sample_prompts),
                              config.sample.sample_sampler, config.model.v_parameterization, tr.seed,
                              config.output.output_name, run.run_dir / "samples", run.log)
    return RunOutputs(run.run_dir, config, run.plan, run.family, devices.accelerator, models.network, models.sd,
                      run.status, run.progress, devices.trackers, base_metadata, devices.weight_dtype, validator,
                      sampler, resumed_at=start.step, state_bytes=optim.state_bytes)


class TrainingLoop:
    """The epochs: each micro-batch is prefetch → loss → backward; every GA micro-batches (and at an
    epoch's end) gradients sync → clip → optimizer step → bookkeeping (losses, status, samples,
    validation, saves, state, stop)."""

    def __init__(self, run: RunContext, devices: Devices, models: Models, data: Data, optim: Optimization,
                 outputs: RunOutputs, start: Position):
        self.run, self.devices, self.models, self.data, self.optim, self.outputs = \
            run, devices, models, data, optim, outputs
        self.start = self.position = start
        self.grad_accum = run.config.training.gradient_accumulation_steps
        self.loss = DiffusionLoss(run.config, run.plan, models.sd, models.conditioner, data.draws, devices.device,
                                  devices.weight_dtype, run.family.latent_scaling_factor, models.train_text_encoder,
                                  data.latent_cache, data.text_cache, data.original_sizes)
        outputs.current_state = self.state_now

    def train(self) -> None:
        plan, start = self.run.plan, self.start
        # batches are built on a background thread in the loop's order (same random stream)
        self.prefetch = BatchPrefetcher(
            self.data.loader, planned_jobs(self.data.batches, start.epoch, plan.epochs, start.batches_done,
                                           self.grad_accum, start.step, plan.total_steps),
            pin_memory=self.devices.device.type == "cuda" and self.data.latent_cache is None)
        self.timing = StepTiming(self.run.config.training.torch_compile)
        self.run.progress.__enter__()
        try:
            self.outputs.sample(0, 0)  # sample_at_first
            self.timing.start()  # the time to the first step counts from here (compiling, first allocations)
            for epoch in range(start.epoch, plan.epochs + 1):
                self._epoch(epoch)
                if self.position.step >= plan.total_steps:
                    break
        finally:
            self.prefetch.close()
            self.run.progress.__exit__(None, None, None)
            self.outputs.close()

    def state_now(self) -> TrainState:
        """The training state a save at this point records (the loader RNG as of the last batch taken)."""
        p = self.position
        return TrainState(p.step, p.epoch, p.batches_done, self.prefetch.rng_state)

    def _epoch(self, epoch: int) -> None:
        epoch_batches = self.data.batches.epoch_batches(epoch)
        self.run.status.write(epoch=epoch)
        for i, indices in enumerate(epoch_batches):
            if epoch == self.start.epoch and i < self.start.batches_done:
                continue  # consumed before the state was saved
            # accelerate syncs every GA micro-batches and on the last batch of the epoch
            sync = (i + 1) % self.grad_accum == 0 or i == len(epoch_batches) - 1
            loss = self._forward_backward(indices, epoch, sync)
            if not sync:
                continue
            self._optimizer_step()
            self.position = Position(self.position.step + 1, epoch, i + 1)
            self.timing.stepped(self.run.status, self.run.log)
            self._after_step(loss)
            if self.position.step >= self.run.plan.total_steps:
                break
        self._after_epoch(epoch)

    def _forward_backward(self, indices: list[int], epoch: int, sync: bool) -> torch.Tensor:
        accelerator = self.devices.accelerator
        batch = self.prefetch(indices, epoch, self.position.step)
        with accelerator.no_sync(self.models.network) if not sync else nullcontext():
            with accelerator.autocast():
                loss = self.loss.compute(batch)
            accelerator.backward(loss / self.grad_accum)
        return loss

    def _optimizer_step(self) -> None:
        accelerator, optim, config = self.devices.accelerator, self.optim, self.run.config
        if accelerator.num_processes > 1:
            # the network is not DDP-wrapped (its forward is the UNet's): one flat all-reduce per bucket
            average_gradients(accelerator.reduce, optim.params)
        if config.optimizer.max_grad_norm:
            accelerator.clip_grad_norm_(optim.params, config.optimizer.max_grad_norm)
        optim.optimizer.step()
        optim.lr_scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        if config.network.scale_weight_norms:
            self.models.network.apply_max_norm_regularization(config.network.scale_weight_norms, self.devices.device)

    def _after_step(self, loss: torch.Tensor) -> None:
        """Losses, status, then what the plan schedules at this step: samples, validation, a file, a state."""
        step, epoch, out, outputs = self.position.step, self.position.epoch, self.run.config.output, self.outputs
        outputs.losses.add(step, epoch, loss, current_lrs(self.optim.optimizer, self.optim.lr_scheduler))
        if outputs.losses.due():
            outputs.report_losses()
        self.run.status.write(step=step)
        outputs.sample(step, None)
        outputs.validate(step, epoch, at_epoch_end=False)
        if out.save_every_n_steps and step % out.save_every_n_steps == 0:
            outputs.save("step", step, step, epoch - 1)  # sd-scripts records 0-based here
        stop, every = self.run.stop, out.save_state_every_n_steps
        if stop.requested or (every and step % every == 0):
            outputs.save_state(self.state_now())
        if stop.requested:
            raise Interrupted(f"interrupted at step {step}; the state is saved: "
                              f"loracli train --resume {self.run.run_dir}")

    def _after_epoch(self, epoch: int) -> None:
        plan, out, outputs, step = self.run.plan, self.run.config.output, self.outputs, self.position.step
        outputs.report_losses()
        self.run.progress.epoch_done(epoch, plan.epochs, step, plan.total_steps)
        outputs.draw_curves()
        outputs.sample(step, epoch)
        outputs.validate(step, epoch, at_epoch_end=True)
        if out.save_every_n_epochs and epoch % out.save_every_n_epochs == 0 and epoch < plan.epochs:
            outputs.save("epoch", epoch, step, epoch)


def _finish(run: RunContext, devices: Devices, outputs: RunOutputs, loop: TrainingLoop) -> Path:
    """The final file, the curves, the trackers closed, and the summary."""
    outputs.save("final", 0, loop.position.step, run.plan.epochs)
    outputs.draw_curves()
    devices.accelerator.wait_for_everyone()
    if devices.trackers:
        devices.accelerator.end_training()
    final = run.run_dir / final_file_name(run.config.output.output_name)
    run.log(f"saved {final}")
    if devices.accelerator.is_main_process:
        for line in run_summary(run.run_dir, run.status.data["started_at"], loop.start.step,
                                run.plan.images_per_step()):
            run.log(line)
        loop.timing.finished(run.status, run.log)
    return final


# --- helpers of the phases ------------------------------------------------------------------------

def _place_models(sd: SDComponents, network, device, weight_dtype, mixed_precision: str,
                  config: LoracliConfig, unet_on_device: bool = True, network_dtype: torch.dtype | None = None
                  ) -> None:
    """Frozen weights in the training dtype on the device (fp8_base: stored in fp8, cast before they
    move, so the device never holds the full-size copy); the VAE in fp32 under fp16 (it overflows)
    or with no_half_vae; the network in fp32, or network_dtype (full_fp16 / full_bf16).
    unet_on_device=False casts the UNet but leaves it where it is."""
    tr = config.training
    vae_fp32 = mixed_precision == "fp16" or config.model.no_half_vae
    fp8_modules = ([sd.unet] if tr.fp8_base or tr.fp8_base_unet else []) + \
        (list(sd.text_encoders) if tr.fp8_base and not tr.fp8_base_unet else [])
    for module in fp8_modules:  # after the network wrapped its layers (it finds them by class name)
        store_in_fp8(module, weight_dtype)
    sd.unet.to(device if unet_on_device else None, dtype=None if sd.unet in fp8_modules else weight_dtype)
    for module in sd.text_encoders:
        module.to(device, dtype=None if module in fp8_modules else weight_dtype)
    sd.vae.to(device, dtype=torch.float32 if vae_fp32 else weight_dtype)
    network.to(device, dtype=network_dtype)


def _enable_gradient_checkpointing(sd: SDComponents, train_te: bool) -> None:
    sd.unet.enable_gradient_checkpointing()
    sd.unet.train()  # diffusers only checkpoints in training mode; the SD UNet has no dropout
    if train_te:
        for te in sd.text_encoders:
            # transformers 5 renamed it; older releases only have the first name
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
            te.train()


def _caches_text(config: LoracliConfig) -> bool:
    return config.training.cache_text_encoder_outputs or config.training.cache_text_encoder_outputs_to_disk


def _text_cache(config: LoracliConfig, plan: Plan, conditioner: Conditioner, device, log) -> TextCache:
    """Every caption the plan will show the text encoders, encoded once (captions are fixed: lint E4)."""
    disk = _cache_dir() / "text" if config.training.cache_text_encoder_outputs_to_disk else None
    cache = TextCache(conditioner, config.model.pretrained_model_name_or_path, disk)
    options = [caption_options(o) for o in image_options(config, plan.images)]  # each image's subset's
    captions = [process_caption(im.caption, o, 1, 0, plan.total_steps, random.Random(0))
                for im, o in zip(plan.images, options)]
    cache.fill(captions, device, config.dataset.vae_batch_size)
    log(f"text-encoder outputs cached: {cache.encoded} encoded, {len(cache.memory) - cache.encoded} read from disk")
    return cache


def _enable_xformers(unet) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(Problem("training.xformers", "xformers needs a CUDA GPU", "remove it; SDPA is the default"))
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise ConfigError(Problem("training.xformers", "xformers is not installed",
                                  "pip install 'loracli[xformers]', or remove it (SDPA is the default)")) from None
    unet.enable_xformers_memory_efficient_attention()


def _cache_dir() -> Path:
    return Path(os.environ.get("LORACLI_CACHE", Path.home() / ".cache" / "loracli"))


def main(argv: list[str] | None = None) -> None:
    """Entry point for `accelerate launch -m loracli.run.launch RUN_DIR`."""
    args = sys.argv[1:] if argv is None else argv
    train(Path(args[0]), resume="--resume" in args[1:])
