"""``cpu_offload``: the text encoders and the VAE on the device only while they run, the denoiser
waiting on the CPU while the training caches fill, the same pixels and losses as resident.

On a CPU worker both places are the CPU, so these tests read the placement's own record of what
is on the device (:attr:`Placement.resident`), sampled from inside each component's forward, and
check the pipeline's execution device against a sentinel device the hooks report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from services.gpu.families import FAMILIES, build_tiny_pipeline
from services.gpu.generate.render import GenerationRequest, render
from services.gpu.models import LoadedPipeline, PipelineKey, wrap_pipeline
from services.gpu.train.dataset import fit, load_rgb
from services.gpu.train.trainer import LoraTrainer, TrainConfig
from tests.gpu.conftest import write_dataset

pytestmark = pytest.mark.gpu

BUILTINS = [family.builtin for family in FAMILIES]
SIZE = 32


def _entry(model: str) -> LoadedPipeline:
    return wrap_pipeline(build_tiny_pipeline(model), PipelineKey(model, "float32", "cpu"))


@contextmanager
def _while_running(entry: LoadedPipeline, names: list[str]) -> Iterator[dict[str, list[set[str]]]]:
    """For each component, the resident set seen from inside its forward (hooks on its
    submodules run after the placement's own hook has brought the component)."""
    seen: dict[str, list[set[str]]] = {name: [] for name in names}
    handles = []
    for name in names:
        record = seen[name]
        for child in list(getattr(entry.pipe, name).modules())[1:]:
            hook = child.register_forward_pre_hook(lambda *_a, r=record: r.append(set(entry.placement.resident)))
            handles.append(hook)
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("model", BUILTINS)
def test_offloaded_pipeline_runs_on_the_device_the_hooks_report(model: str) -> None:
    """Catches a pipeline that would run on the CPU because its first component waits there:
    diffusers' ``_execution_device`` must be the hooks' device (a sentinel here), and the
    denoiser must carry no hook (compile, peft and the optimizer see a plain module)."""
    from services.gpu.placement import Placement

    pipe = build_tiny_pipeline(model)
    entry = _entry(model)
    sentinel = torch.device("meta")
    placement = Placement(pipe, entry.denoiser_name, sentinel)
    placement.set_offload(True)
    assert pipe._execution_device == sentinel
    assert not hasattr(getattr(pipe, entry.denoiser_name), "_hf_hook")
    assert placement.resident == {entry.denoiser_name}


@pytest.mark.parametrize("model", BUILTINS)
def test_generation_with_cpu_offload_renders_the_same_image_one_encoder_at_a_time(model: str) -> None:
    """Catches offloaded generation that differs from resident generation, keeps an encoder on
    the device beside the denoiser's steps, runs the largest encoder (T5, Qwen3) beside the
    denoiser, or leaves one on the device after the call."""
    entry = _entry(model)
    request = GenerationRequest(prompt="a red square", width=SIZE, height=SIZE, seed=3, steps=2)
    resident = np.asarray(render(entry, request, None, compile=False)[0])
    placement = entry.placement
    placement.set_offload(True)
    encoders = [n for n in placement.parkable if n != "vae"]
    with _while_running(entry, [*encoders, entry.denoiser_name]) as seen:
        offloaded = np.asarray(render(entry, request, None, compile=False)[0])
    np.testing.assert_array_equal(offloaded, resident)
    assert placement.alone == max(encoders, key=lambda n: sum(p.numel() for p in getattr(entry.pipe, n).parameters()))
    for name in encoders:  # the largest runs alone (the denoiser on the CPU), the others beside it
        expected = {name} if name == placement.alone else {entry.denoiser_name, name}
        assert seen[name] and all(r == expected for r in seen[name]), (name, seen[name])
    assert seen[entry.denoiser_name] and all(r == {entry.denoiser_name} for r in seen[entry.denoiser_name])
    assert placement.resident == {entry.denoiser_name}
    placement.set_offload(False)
    assert placement.resident == {entry.denoiser_name, *placement.parkable}
    assert not any(hasattr(getattr(entry.pipe, n), "_hf_hook") for n in placement.parkable)


def _losses(entry: LoadedPipeline, tmp_path: Path, steps: int = 2) -> tuple[list[float], LoraTrainer]:
    paths = sorted(write_dataset(tmp_path, 2).glob("*.png"))
    images = [fit(load_rgb(p), (SIZE, SIZE)) for p in paths]
    trainer = LoraTrainer(entry, TrainConfig(steps=steps, rank=2, alpha=2.0, seed=5))
    try:
        trainer.setup(images, ["a red square", "a blue circle"])
        return [float(trainer.step()) for _ in range(steps)], trainer
    finally:
        trainer.close()


@pytest.mark.parametrize("model", ["builtin:tiny-flux", "builtin:tiny-sdxl"])
def test_training_with_cpu_offload_parks_the_denoiser_while_the_caches_fill(model: str, tmp_path: Path) -> None:
    """Catches the largest encoder (T5) filling the caches beside the denoiser, caches kept on
    the device, a placement not restored after the run, or offloaded training that learns
    differently: the losses equal the resident run's."""
    resident_losses, _ = _losses(_entry(model), tmp_path / "a")
    entry = _entry(model)
    entry.placement.set_offload(True)
    encoders = [n for n in entry.placement.parkable if n != "vae"]
    with _while_running(entry, [*encoders, "vae"]) as seen:
        losses, trainer = _losses(entry, tmp_path / "b")
    assert losses == resident_losses
    for name in encoders:  # the text encoders fill the caches together, the denoiser away
        assert seen[name] and all(r == set(encoders) for r in seen[name]), (name, seen[name])
    assert seen["vae"] == [{"vae"}] * len(seen["vae"]) and seen["vae"]
    assert entry.placement.offloaded and entry.placement.resident == {entry.denoiser_name}
    assert entry.placement.moves > 0
    assert trainer.latent_dist is None  # dropped at close; during the run they lived on the CPU


def test_cpu_offload_through_test_input_trains_samples_and_generates(tmp_path: Path) -> None:
    """The README's ``cpu_offload`` as users reach it: a train_lora with sample prompts and a
    generate, each with ``cpu_offload: true``, through ``rp_handler.py --test_input``."""
    from tests.test_entrypoint import printed_result, run_worker

    write_dataset(tmp_path / "storage" / "datasets" / "offset", 2)  # the local store's layout
    train = {
        "action": "train_lora",
        "dataset": "offset",
        "output_name": "offloaded",
        "base_model": "builtin:tiny-zimage",
        "steps": 2,
        "rank": 2,
        "cpu_offload": True,
        "sample_prompts": ["a red square"],
        "sample_steps": 2,
    }
    trained = run_worker(tmp_path, train)
    out = printed_result(trained)
    assert trained.returncode == 0 and "error" not in out, out
    assert out["metrics"]["cpu_offload"] is True and [s["name"] for s in out["samples"]] == ["sample-0.png"]
    generate = {
        "action": "generate",
        "prompt": "a red square",
        "base_model": "builtin:tiny-zimage",
        "lora": "offloaded",
        "steps": 2,
        "width": 32,
        "height": 32,
        "cpu_offload": True,
    }
    generated = run_worker(tmp_path, generate)
    out = printed_result(generated)
    assert generated.returncode == 0 and [i["name"] for i in out["images"]] == ["image-0.png"], out


def test_a_stop_while_the_caches_fill_leaves_the_pipeline_as_it_was(tmp_path: Path) -> None:
    """Catches a denoiser left parked on the CPU (or encoders left hooked) when a job stops
    while the captions encode under cpu_offload: the cached pipeline must be as it was."""
    from services.errors import JobStopped
    from services.job.stop import StopSignal

    entry = _entry("builtin:tiny-flux")
    paths = sorted(write_dataset(tmp_path, 2).glob("*.png"))
    images = [fit(load_rgb(p), (SIZE, SIZE)) for p in paths]
    stop = StopSignal()
    stop.set("shutdown")
    entry.placement.set_offload(True)
    trainer = LoraTrainer(entry, TrainConfig(steps=1, rank=2))
    with pytest.raises(JobStopped):
        try:
            trainer.setup(images, ["a", "b"], stop)
        finally:
            trainer.close()
    assert entry.placement.offloaded and entry.placement.resident == {entry.denoiser_name}
    entry.placement.set_offload(False)
    assert entry.placement.resident == {entry.denoiser_name, *entry.placement.parkable}


def test_an_encoder_that_raises_mid_step_does_not_stay_on_the_device(tmp_path: Path) -> None:
    """Catches T5 (and a parked denoiser) left where the failed forward left them: with
    cpu_offload and uncached captions, a text encoder that raises (an out-of-memory error) in a
    step; after close the denoiser is back and only it is on the device."""
    entry = _entry("builtin:tiny-flux")
    entry.placement.set_offload(True)
    paths = sorted(write_dataset(tmp_path, 2).glob("*.png"))
    trainer = LoraTrainer(entry, TrainConfig(steps=2, rank=2, cache_text_embeddings=False))
    lone = getattr(entry.pipe, entry.placement.alone)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        try:
            trainer.setup([fit(load_rgb(p), (SIZE, SIZE)) for p in paths], ["a", "b"])
            lone._old_forward = out_of_memory
            trainer.step()
        finally:
            trainer.close()
    assert entry.placement.resident == {entry.denoiser_name}


def test_resident_training_renders_samples_with_the_denoiser_in_place(tmp_path: Path) -> None:
    """Catches a resident plan (the card holds everything) paying cpu_offload's transfers: the
    encoders wait on the CPU during the loop and come back one at a time for the samples, but
    the denoiser never leaves the device, not even for T5; at close all is resident again."""
    entry = _entry("builtin:tiny-flux")
    paths = sorted(write_dataset(tmp_path, 2).glob("*.png"))
    trainer = LoraTrainer(entry, TrainConfig(steps=1, rank=2))
    request = GenerationRequest(prompt="a red square", width=SIZE, height=SIZE, seed=3, steps=2)
    try:
        trainer.setup([fit(load_rgb(p), (SIZE, SIZE)) for p in paths], ["a", "b"])
        assert entry.placement.resident == {entry.denoiser_name}  # the loop: encoders on the CPU
        with _while_running(entry, [entry.placement.alone]) as seen, trainer.sampling():
            render(entry, request, None, compile=False)
    finally:
        trainer.close()
    lone = entry.placement.alone
    assert seen[lone] and all(r == {entry.denoiser_name, lone} for r in seen[lone]), seen[lone]
    assert not entry.placement.offloaded
    assert entry.placement.resident == {entry.denoiser_name, *entry.placement.parkable}


def test_a_placement_change_that_failed_half_way_is_repaired_by_the_next(tmp_path: Path) -> None:
    """Catches a flag-only early return: a move that raises (out of memory) during set_offload
    leaves components half-hooked; asking for the same placement again must finish the job."""
    entry = _entry("builtin:tiny-flux")
    placement, vae = entry.placement, entry.pipe.vae

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("simulated")

    vae.to = out_of_memory  # the instance's, over the module's method
    with pytest.raises(torch.OutOfMemoryError):
        placement.set_offload(True)
    del vae.to
    placement.set_offload(True)
    assert placement.resident == {entry.denoiser_name}
    assert all(hasattr(getattr(entry.pipe, n), "_hf_hook") for n in placement.parkable)
    placement.set_offload(False)
    assert placement.resident == {entry.denoiser_name, *placement.parkable}
    assert not any(hasattr(getattr(entry.pipe, n), "_hf_hook") for n in placement.parkable)


def test_offloaded_generation_runs_the_denoiser_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches cpu_offload generation through CUDA graphs (COMPILE on): the denoiser moves to the
    CPU and back every call, so captured graphs would re-record each time."""
    from services.gpu import compiled
    from services.gpu.generate.render import generate_images
    from services.gpu.params import GenerateInput
    from tests.gpu.conftest import gpu_settings

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("the denoiser was compiled under cpu_offload")

    monkeypatch.setattr(compiled, "compiled_denoiser", no_compile)
    params = GenerateInput(
        action="generate", prompt="a red square", base_model="builtin:tiny-sd", steps=1, width=32, height=32
    )
    settings = gpu_settings(compile=True)
    assert len(generate_images(params.model_copy(update={"cpu_offload": True}), None, settings).images) == 1
    with pytest.raises(AssertionError, match="compiled under cpu_offload"):  # resident: compiled
        generate_images(params.model_copy(update={"cpu_offload": False}), None, settings)
