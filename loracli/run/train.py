"""The training recipe, top to bottom.

read the run folder → accelerator → models → network → data → optimizer →
loop (the diffusion step) → save. The plan fixes every number (batches, steps,
epochs, warmup, save points); this file only carries it out, and stops if the
data it builds does not match the plan.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from loracli.config.loader import read_toml
from loracli.config.schema import LoracliConfig
from loracli.errors import ConfigError, Interrupted, Problem, TrainingError
from loracli.family import FAMILIES
from loracli.lint import trains_text_encoder
from loracli.network_blocks import BlockOptions, extra_network_args
from loracli.plan import Plan, load_plan
from loracli.report.curves import write_curves
from loracli.captions import process_caption
from loracli.run.compiled import StepTiming, compile_failure, compile_unet
from loracli.run.conditioning import Conditioner, TextCache, conditioner_for
from loracli.dataset.subsets import image_options
from loracli.run.data import BucketBatches, ExampleLoader, caption_options, mask_source, original_size
from loracli.run.latents import LatentCache, encode
from loracli.run.metadata import (
    assemble_file_metadata,
    build_metadata,
    modelspec_metadata,
    no_metadata_subset,
    per_save_metadata,
)
from loracli.run.fp8 import store_in_fp8
from loracli.run.global_draws import GlobalDraws
from loracli.run.models import SDComponents, load_sd_components
from loracli.run.network import (
    LoraPlus,
    NetworkSpec,
    create_network,
    load_network_weights,
    prepare_param_groups,
    to_kohya_state_dict,
)
from loracli.run.optim import adafactor_uses_relative_step, build_optimizer, build_scheduler, current_lrs
from loracli.run.prefetch import BatchPrefetcher, planned_jobs, to_device
from loracli.run.precision import allow_fp16_unscale, network_dtype
from loracli.run.progress import TrainingProgress, loading_model_line, quiet_third_party, run_summary
from loracli.run.sampling import SampleMaker
from loracli.run.saving import atomic_save_safetensors, cast_for_save, save_failure
from loracli.run.state import TrainState, load_latest_state, loader_rng_state, save_state
from loracli.run.step import (
    LossOptions,
    compute_target,
    diffusion_loss,
    enforce_zero_terminal_snr,
    input_perturbation,
    sample_noise,
    sample_timesteps,
)
from loracli.run.validation import Validator, due_after_epoch, due_after_step, run_validation
from loracli.run.step_sync import LossWatch, average_gradients, loss_check_interval
from loracli.rundir import atomic_write_json, atomic_write_text
from loracli.sample_prompts import read_prompt_file, round_label
from loracli.schedule import epoch_file_name, final_file_name, kept_after_pruning, step_file_name
from loracli.trackers import init_trackers, log_sample_images, tracker_names

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


def _train(run_dir: Path, config: LoracliConfig, plan: Plan, status: StatusFile, stop: StopFlag,
           resume: bool) -> Path:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    tr, ds, net, opt, out = config.training, config.dataset, config.network, config.optimizer, config.output
    family = FAMILIES[plan.model_family]
    main_process = int(os.environ.get("RANK", "0")) == 0
    progress = TrainingProgress(plan.total_steps, enabled=main_process, optimizer_type=opt.optimizer_type)
    log = progress.log

    # --- accelerator: one process in-process, or one of N under accelerate launch
    if "LOCAL_RANK" not in os.environ:
        AcceleratorState._reset_state(reset_partial_state=True)  # allow several runs in one process
    mixed_precision = resolve_mixed_precision(tr.mixed_precision, log)
    logging_dir = config.logging.logging_dir
    trackers = tracker_names(config)  # tensorboard / wandb, as logging.log_with and logging_dir say
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes then use gloo (how multi-process is tested)
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_dir=str(logging_dir) if logging_dir else None,
    )
    if accelerator.num_processes != plan.num_processes:
        raise TrainingError(f"the plan is for {plan.num_processes} process(es) but {accelerator.num_processes} run")
    set_seed(tr.seed)
    device = accelerator.device
    weight_dtype = DTYPES[mixed_precision]
    trained_dtype = network_dtype(tr.full_fp16, tr.full_bf16, mixed_precision, log)  # full_fp16 / full_bf16
    if trained_dtype == torch.float16:
        allow_fp16_unscale(accelerator.scaler)  # the scaler refuses fp16 gradients otherwise

    # --- models: frozen base weights in the training dtype, network in fp32
    log(loading_model_line(config.model.pretrained_model_name_or_path, family.title, getattr(plan, "model_path", None)))
    sd = load_sd_components(getattr(plan, "model_path", None) or config.model.pretrained_model_name_or_path,
                            config.model.v2, sdxl=family.name == "sdxl",
                            v_parameterization=config.model.v_parameterization,
                            allow_pickle=config.model.allow_pickle_checkpoint)
    if tr.xformers:
        _enable_xformers(sd.unet)
    network = create_network(network_spec(config), sd.text_encoders, sd.unet, sd.family)
    if net.network_weights is not None:
        load_network_weights(network, net.network_weights)
    train_te = trains_text_encoder(config, len(sd.text_encoders))
    # with cached latents the UNet reaches the device after the cache is built (the VAE pass has it to itself)
    unet_after_cache = ds.cache_latents or ds.cache_latents_to_disk
    _place_models(sd, network, device, weight_dtype, mixed_precision, config, unet_on_device=not unet_after_cache,
                  network_dtype=trained_dtype)
    if tr.gradient_checkpointing:
        _enable_gradient_checkpointing(sd, train_te)
    network.train()
    if tr.torch_compile:  # compiled at the first forward (and again per new bucket shape at first)
        compile_unet(sd.unet, tr.dynamo_backend)
    conditioner = conditioner_for(sd, ds.max_token_length, config.model.clip_skip, tr.weighted_captions)
    if tr.zero_terminal_snr:
        enforce_zero_terminal_snr(sd.noise_scheduler)
    loss_options = LossOptions(tr.loss_type, tr.huber_schedule, tr.huber_c, tr.huber_scale,
                               tr.scale_v_pred_loss_like_noise_pred, tr.v_pred_like_loss, tr.debiased_estimation_loss)
    # the held-out images' latents, noise and timesteps, fixed now (the VAE may leave the device below)
    validator = Validator(plan, config, sd, conditioner, family.latent_scaling_factor, device, _caches_text(config)) \
        if getattr(plan, "validation_images", None) and main_process else None

    # --- data: the plan's bucket-batches; the run never recomputes the schedule
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
    cache = None
    if ds.cache_latents or ds.cache_latents_to_disk:
        disk = _cache_dir() / "latents" if ds.cache_latents_to_disk else None
        cache = LatentCache(plan, [o.flip_aug for o in per_image], disk,
                            [mask_source(im, o) for im, o in zip(plan.images, per_image)])
        cache.fill(sd.vae, family.latent_scaling_factor, config.model.pretrained_model_name_or_path,
                   ds.vae_batch_size, tr.seed)
        log(f"latents cached: {cache.encoded} encoded, {cache.count_needed() - cache.encoded} read from disk")
        sd.vae.to("cpu")  # no longer needed on the device
    if unet_after_cache:
        sd.unet.to(device)
    loader = ExampleLoader(plan, ds, plan.total_steps, load_pixels_=cache is None, seed=tr.seed + 1,
                           image_options=per_image)
    original_sizes = [original_size(im, o, cache is not None) for im, o in zip(plan.images, per_image)]  # SDXL
    text_cache = _text_cache(config, plan, conditioner, device, log) if _caches_text(config) else None
    if text_cache is not None and not plan.sample_rounds:
        for te in sd.text_encoders:  # frozen and no longer read: free the device (sd-scripts does too)
            te.to("cpu")

    # --- optimizer and schedule (sd-scripts' param groups: text encoder first, then UNet)
    groups = prepare_param_groups(network, opt.text_encoder_lr, opt.unet_lr, opt.learning_rate)
    optimizer, optimizer_name = build_optimizer(opt.optimizer_type, groups, opt.learning_rate, opt.optimizer_args)
    relative_step = adafactor_uses_relative_step(opt.optimizer_type, opt.optimizer_args)
    scheduler_name = "adafactor" if relative_step else opt.lr_scheduler
    # The scheduler steps num_processes times per update (accelerate), hence the product.
    lr_scheduler = build_scheduler(scheduler_name, optimizer, plan.warmup_steps,
                                   plan.total_steps * plan.num_processes, opt.lr_scheduler_num_cycles,
                                   opt.lr_scheduler_power, opt.learning_rate if relative_step else None)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(network)  # its weights travel with the optimizer state
    params = [p for g in groups for p in g["params"]]
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in params)  # weights + optimizer moments + slack

    # --- resume: weights, optimizer, schedule and RNG from the last complete state
    global_step, start_epoch, skip = 0, 1, 0
    if resume:
        state = load_latest_state(accelerator, run_dir)
        if state is None:
            raise TrainingError(f"{run_dir} has no complete training state to resume from; start a new run "
                                "(set output.save_state_every_n_steps to save states regularly)")
        global_step, start_epoch, skip = state.global_step, state.epoch, state.batches_done
        loader.rng.setstate(loader_rng_state(state))
        _forget_after(run_dir, global_step)
        log(f"resuming at step {global_step} (epoch {start_epoch}, {skip} batches done)")
        status.write(step=global_step, start_step=global_step, epoch=start_epoch)
        progress.progress.update(progress.task, completed=global_step)
    if accelerator.is_main_process and trackers:
        init_trackers(accelerator, config, plan, run_dir.name)

    # --- what every saved file carries
    started_at = time.time()
    base_meta = build_metadata(
        # session_id from its own RNG, so the seeded stream (and a resumed run) is untouched
        config, plan, family, session_id=random.Random().randint(0, 2**32), training_started_at=started_at,
        optimizer_name=optimizer_name,
        lr_scheduler_name=f"adafactor:{opt.learning_rate}" if relative_step else opt.lr_scheduler,
        learning_rate_recorded=None if relative_step else opt.learning_rate,
        network_args=network_args_metadata(config), config_hash=plan.config_hash,
        mixed_precision=mixed_precision,  # the effective one (fp16 on a CPU falls back to "no")
    )
    saved = _saved_so_far(run_dir, out.output_name)  # for pruning; non-empty when resuming

    def save(kind: str, number: int, step: int, epoch: int) -> None:
        report_losses()  # the NaN check runs before every save
        if not accelerator.is_main_process:
            return
        name = {"epoch": lambda: epoch_file_name(out.output_name, number),
                "step": lambda: step_file_name(out.output_name, number),
                "final": lambda: final_file_name(out.output_name)}[kind]()
        tensors = cast_for_save(to_kohya_state_dict(network), out.save_precision)
        meta = per_save_metadata(base_meta, steps=step, epoch=epoch, finished_at=time.time())
        if out.no_metadata:
            meta = no_metadata_subset(meta)
        # modelspec.date is the time of this save, as sd-scripts stamps each file
        modelspec = modelspec_metadata(config, family, title=out.output_name, resolution=ds.resolution_wh,
                                       timestamp=time.time())
        try:
            atomic_save_safetensors(tensors, assemble_file_metadata(meta, modelspec, tensors), run_dir / name)
        except OSError as exc:  # a full disk: keep what can be resumed, then say how
            raise save_failure(exc, run_dir / name, run_dir, state_after_failed_save()) from None
        status.write(last_save=name)
        if kind in saved:
            _prune(run_dir, kind, number, saved[kind], config)

    def state_after_failed_save() -> Path | None:
        """The training state, saved when a LoRA file could not be (None when that fails too)."""
        if accelerator.num_processes != 1:  # save_state waits for every process; the others are not here
            return None
        try:
            return save_state(accelerator, run_dir, TrainState(*position, prefetch.rng_state),
                              out.save_last_n_states, state_bytes)
        except (OSError, TrainingError):
            return None

    # --- sample images at the plan's rounds (made by the main process; the others wait)
    sample_rounds = {r["label"]: r for r in plan.sample_rounds}
    resumed_at = global_step
    sampler = None
    if sample_rounds and accelerator.is_main_process:
        sampler = SampleMaker(sd, conditioner, read_prompt_file(config.sample.sample_prompts),
                              config.sample.sample_sampler, config.model.v_parameterization, tr.seed,
                              out.output_name, run_dir / "samples", log)

    def sample(step: int, epoch: int | None) -> None:
        label = round_label(step, epoch)
        # A resumed run redoes an epoch-end round at its own step (it may have been cut short).
        if label not in sample_rounds or step < resumed_at or (step == resumed_at and epoch is None):
            return
        report_losses()
        if sampler is not None:
            started = time.time()
            made = sampler.make_round(label, device, accelerator.autocast, [sd.unet, *sd.text_encoders, network])
            title = f"{out.output_name or run_dir.name}: samples by round ({config.sample.sample_sampler})"
            grid = sampler.update_grid([lb for lb in sample_rounds if sample_rounds[lb]["step"] <= step], title)
            if trackers:
                log_sample_images(accelerator, made, step)
            status.write(last_sample=label)
            log(f"sample images ({label}): {len(made)} in {time.time() - started:.1f}s, grid {grid.name}")
        accelerator.wait_for_everyone()

    def validate(step: int, epoch: int, at_epoch_end: bool) -> None:
        """The validation loss when the plan holds images out and a round is due (run/validation.py)."""
        if validator is not None and (due_after_epoch(config, epoch) if at_epoch_end else due_after_step(config, step)):
            report_losses()  # the trackers (wandb) must see the steps in order
        run_validation(validator, config, step, epoch, at_epoch_end, network, accelerator.autocast, weight_dtype,
                       metrics, accelerator, trackers, log)

    def draw_curves() -> None:
        """loss.png and lr.png from metrics.jsonl; a plotting failure never stops training."""
        if not accelerator.is_main_process:
            return
        if metrics and not metrics.closed:
            metrics.flush()
        try:
            write_curves(run_dir)
        except Exception as exc:  # noqa: BLE001 - a plot must never end a run
            log(f"warning: could not draw the curves: {exc}")

    # --- the loop
    ga = tr.gradient_accumulation_steps
    noise_scheduler = sd.noise_scheduler
    num_timesteps = noise_scheduler.config.num_train_timesteps
    metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if accelerator.is_main_process else None
    losses = LossWatch(loss_check_interval(device))  # read on the host every N steps, not every step

    def report_losses() -> None:
        """Read the pending losses (one host sync; stops on NaN/inf) and log them."""
        for r in losses.flush():
            progress.step(r.loss, next(iter(r.lrs.values()), 0.0), r.epoch)
            if metrics and not metrics.closed:
                metrics.write(json.dumps({"step": r.step, "epoch": r.epoch, "loss": r.loss, "lr": r.lrs}) + "\n")
            if trackers:
                accelerator.log({"loss/current": r.loss, **{f"lr/{k}": v for k, v in r.lrs.items()}}, step=r.step)

    # batches are built on a background thread in the loop's order (same random stream)
    prefetch = BatchPrefetcher(loader, planned_jobs(batches, start_epoch, plan.epochs, skip, ga, global_step,
                                                    plan.total_steps),
                               pin_memory=device.type == "cuda" and cache is None)
    position = (global_step, start_epoch, skip)
    timing = StepTiming(tr.torch_compile)
    progress.__enter__()
    try:
        sample(0, 0)  # sample_at_first
        timing.start()  # the time to the first step counts from here (compiling, first allocations)
        for epoch in range(start_epoch, plan.epochs + 1):
            epoch_batches = batches.epoch_batches(epoch)
            status.write(epoch=epoch)
            for i, indices in enumerate(epoch_batches):
                if epoch == start_epoch and i < skip:
                    continue  # consumed before the state was saved
                # accelerate syncs every GA micro-batches and on the last batch of the epoch
                sync = (i + 1) % ga == 0 or i == len(epoch_batches) - 1
                batch = prefetch(indices, epoch, global_step)
                with accelerator.no_sync(network) if not sync else nullcontext():
                    with accelerator.autocast():
                        if cache is not None:
                            latents = cache.batch(batch.indices, batch.flipped).to(device)
                            masks = cache.mask_batch(batch.indices, batch.flipped)
                        else:
                            masks = batch.masks
                            latents = encode(sd.vae, to_device(batch.pixels, device), family.latent_scaling_factor)
                        with torch.set_grad_enabled(train_te):
                            cond = text_cache(batch.captions, device) if text_cache is not None else \
                                conditioner.encode(batch.captions, device)
                        # drawn for the step's batch across all processes; each keeps its rows
                        rows, wide = latents.shape[0], draws.widen(latents)
                        wide_noise = sample_noise(wide, None, tr.noise_offset, tr.noise_offset_random_strength,
                                                  tr.adaptive_noise_scale, tr.multires_noise_iterations,
                                                  tr.multires_noise_discount)
                        noise = draws.own(wide_noise, rows)
                        timesteps = draws.own(sample_timesteps(wide.shape[0], tr.min_timestep, tr.max_timestep,
                                                               num_timesteps, device, None), rows)
                        noisy = noise_scheduler.add_noise(
                            latents, draws.own(input_perturbation(wide, wide_noise, tr.ip_noise_gamma,
                                                                  tr.ip_noise_gamma_random_strength), rows), timesteps)
                        images = [plan.images[i] for i in batch.indices]
                        unet_inputs = conditioner.unet_kwargs(cond, [original_sizes[i] for i in batch.indices],
                                                              [im.bucket for im in images], batch.flipped,
                                                              weight_dtype)
                        pred = sd.unet(noisy.to(weight_dtype), timesteps, **unet_inputs).sample
                        target = compute_target(noise_scheduler, latents, noise, timesteps,
                                                config.model.v_parameterization)
                        weights = torch.where(batch.is_reg.to(device), tr.prior_loss_weight, 1.0)
                        loss = diffusion_loss(pred.float(), target.float(), timesteps, noise_scheduler, weights,
                                              tr.min_snr_gamma, config.model.v_parameterization, loss_options,
                                              masks)
                    accelerator.backward(loss / ga)
                if not sync:
                    continue
                if accelerator.num_processes > 1:
                    # the network is not DDP-wrapped (its forward is the UNet's): one flat all-reduce per bucket
                    average_gradients(accelerator.reduce, params)
                if opt.max_grad_norm:
                    accelerator.clip_grad_norm_(params, opt.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if net.scale_weight_norms:
                    network.apply_max_norm_regularization(net.scale_weight_norms, device)
                global_step += 1
                position = (global_step, epoch, i + 1)  # what a state saved now would resume from
                timing.stepped(status, log)

                losses.add(global_step, epoch, loss, current_lrs(optimizer, lr_scheduler))
                if losses.due():
                    report_losses()
                status.write(step=global_step)
                sample(global_step, None)
                validate(global_step, epoch, at_epoch_end=False)
                if out.save_every_n_steps and global_step % out.save_every_n_steps == 0:
                    save("step", global_step, global_step, epoch - 1)  # sd-scripts records 0-based here
                every = out.save_state_every_n_steps
                if stop.requested or (every and global_step % every == 0):
                    report_losses()
                    if metrics:
                        metrics.flush()
                    save_state(accelerator, run_dir, TrainState(global_step, epoch, i + 1, prefetch.rng_state),
                               out.save_last_n_states, state_bytes)
                if stop.requested:
                    raise Interrupted(f"interrupted at step {global_step}; the state is saved: "
                                      f"loracli train --resume {run_dir}")
                if global_step >= plan.total_steps:
                    break
            report_losses()
            progress.epoch_done(epoch, plan.epochs, global_step, plan.total_steps)
            draw_curves()
            sample(global_step, epoch)
            validate(global_step, epoch, at_epoch_end=True)
            if out.save_every_n_epochs and epoch % out.save_every_n_epochs == 0 and epoch < plan.epochs:
                save("epoch", epoch, global_step, epoch)
            if global_step >= plan.total_steps:
                break
    finally:
        prefetch.close()
        progress.__exit__(None, None, None)
        if metrics:
            metrics.close()
    save("final", 0, global_step, plan.epochs)
    draw_curves()
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    final = run_dir / final_file_name(out.output_name)
    log(f"saved {final}")
    if accelerator.is_main_process:
        for line in run_summary(run_dir, status.data["started_at"], resumed_at,
                                tr.train_batch_size * tr.gradient_accumulation_steps * plan.num_processes):
            log(line)
        timing.finished(status, log)
    return final


def _saved_so_far(run_dir: Path, output_name: str | None) -> dict[str, list[int]]:
    """Epoch and step files already in the run folder (a resumed run prunes them too)."""
    saved: dict[str, list[int]] = {"epoch": [], "step": []}
    stem = output_name or ""
    for path in run_dir.glob("*.safetensors"):
        name = path.stem
        for kind, marker in (("step", f"{stem or 'at'}-step"), ("epoch", f"{stem or 'epoch'}-")):
            rest = name[len(marker):] if name.startswith(marker) else ""
            if rest.isdigit():
                saved[kind].append(int(rest))
                break
    return {k: sorted(v) for k, v in saved.items()}


def _forget_after(run_dir: Path, step: int) -> None:
    """A killed run may have logged steps after its last state: drop them, they will be redone."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(metrics, "".join(line + "\n" for line in lines))


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


def _prune(run_dir: Path, kind: str, number: int, history: list[int], config: LoracliConfig) -> None:
    """save_last_n_epochs / save_last_n_steps: delete what sd-scripts would have deleted by now."""
    out = config.output
    history.append(number)
    every = out.save_every_n_epochs if kind == "epoch" else out.save_every_n_steps
    keep_last = out.save_last_n_epochs if kind == "epoch" else out.save_last_n_steps
    if not every or not keep_last:
        return
    kept = set(kept_after_pruning(list(history), every, keep_last, kind))
    namer = epoch_file_name if kind == "epoch" else step_file_name
    for old in [n for n in history if n not in kept]:
        (run_dir / namer(out.output_name, old)).unlink(missing_ok=True)
        history.remove(old)


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
