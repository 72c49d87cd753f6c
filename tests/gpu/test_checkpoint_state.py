"""A run stopped at step k, captured to files and restored into freshly built objects, ends bit for bit
where the uninterrupted run ends; and every piece of the state is needed for that.

The loop is small but uses each thing a trainer's state holds: a peft LoRA over a frozen model
with dropout (the default torch generator), AdamW with a cosine LR schedule, a noise generator
and a batch generator, python ``random`` and numpy, a batch plan drawn up front with a cursor,
and a loss EMA.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")

from services.errors import CheckpointCorrupt  # noqa: E402
from services.gpu.train.checkpoint_state import (  # noqa: E402
    FILES,
    JSON_FILE,
    LoopState,
    TrainerParts,
    capture,
    restore,
)

TOTAL = 12
SEED = 5
SAMPLES = 10
BATCH = 3


@dataclass
class Run:
    """Everything a tiny training run holds."""

    model: Any
    params: dict[str, Any]
    optimizer: Any
    scheduler: Any
    noise: Any
    batch: Any
    data: Any
    target: Any
    batches: list[list[int]]
    cursor: int = 0
    step: int = 0
    ema: Any = None

    def parts(self) -> TrainerParts:
        return TrainerParts(
            params=self.params,
            states={"optimizer": self.optimizer, "scheduler": self.scheduler},
            generators={"noise": self.noise, "batch": self.batch},
        )

    def loop_state(self) -> LoopState:
        return LoopState(self.step, {"batches": self.batches, "cursor": self.cursor}, self.ema)


def build(seed: int) -> Run:
    """A fresh run: a different ``seed`` gives different weights, generators and plan."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the frozen base is the same in every run (a trainer loads it from disk)
    base = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "3"], init_lora_weights="gaussian")
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.train()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=3e-2, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL)
    data_gen = torch.Generator().manual_seed(99)  # the dataset is the same in every run
    data = torch.randn(SAMPLES, 6, generator=data_gen)
    target = torch.randn(SAMPLES, 4, generator=data_gen)
    batch_gen = torch.Generator().manual_seed(seed)
    batches, order = [], []
    for _ in range(TOTAL):
        batch = []
        while len(batch) < BATCH:
            if not order:
                order = torch.randperm(SAMPLES, generator=batch_gen).tolist()
            batch.append(order.pop())
        batches.append(batch)
    random.seed(seed)
    np.random.seed(seed)
    return Run(
        model, params, optimizer, scheduler, torch.Generator().manual_seed(seed + 1), batch_gen, data, target, batches
    )


def train(run: Run, until: int) -> None:
    """Optimizer steps up to ``until``, drawing from every random source."""
    while run.step < until:
        index = run.batches[run.cursor]
        run.cursor += 1
        x = run.data[index] + 0.1 * torch.randn(len(index), 6, generator=run.noise)
        x = x * (1.0 + 0.05 * random.random()) + float(np.random.normal(scale=0.01))
        loss = torch.nn.functional.mse_loss(run.model(x), run.target[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), 1.0)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.ema = loss.detach() if run.ema is None else run.ema * 0.9 + loss.detach() * 0.1
        run.step += 1


def resumed(folder: Path, interrupted_at: int, perturb: str | None = None) -> Run:
    """Train to ``interrupted_at``, capture, build everything anew (other seeds), restore.

    ``perturb`` names one piece to spoil after the restore, to show that it matters."""
    first = build(SEED)
    train(first, interrupted_at)
    paths = capture(first.parts(), first.loop_state(), folder)
    assert sorted(paths) == sorted(FILES)
    del first
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)  # the global generators move on, as in a new process
    fresh = build(SEED + 100)
    loop = restore(folder, fresh.parts())
    fresh.step, fresh.cursor = loop.step, loop.data_order["cursor"]
    fresh.batches, fresh.ema = loop.data_order["batches"], loop.loss_ema
    spoil = {
        "noise": lambda: fresh.noise.manual_seed(0),
        "batch_order": fresh.batches.reverse,
        "torch_cpu": lambda: torch.manual_seed(0),
        "python": lambda: random.seed(0),
        "numpy": lambda: np.random.seed(0),
        "optimizer": fresh.optimizer.state.clear,
        "scheduler": lambda: setattr(fresh.scheduler, "last_epoch", 0),
    }
    if perturb is not None:
        spoil[perturb]()
    return fresh


def final_state(run: Run) -> dict[str, Any]:
    tensors = {name: p.detach().clone() for name, p in run.params.items()}
    for index, state in run.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt/{index}/{key}"] = value.clone()
    tensors["ema"] = run.ema.clone()
    tensors["next_noise"] = torch.randn(3, generator=run.noise)
    return tensors


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    run = build(SEED)
    train(run, TOTAL)
    return final_state(run)


@pytest.mark.parametrize("interrupted_at", [0, 1, 5, 11, TOTAL])
def test_resumed_run_ends_bit_for_bit_like_the_uninterrupted_one(
    uninterrupted: dict[str, Any], tmp_path: Path, interrupted_at: int
) -> None:
    run = resumed(tmp_path, interrupted_at)
    assert run.step == interrupted_at
    train(run, TOTAL)
    final = final_state(run)
    assert sorted(final) == sorted(uninterrupted)
    unequal = [name for name in final if not torch.equal(final[name], uninterrupted[name])]
    assert unequal == []


def test_resuming_twice_is_still_exact(uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    run = resumed(tmp_path / "a", 4)
    train(run, 8)
    paths = capture(run.parts(), run.loop_state(), tmp_path / "b")
    again = build(SEED + 7)
    loop = restore(paths[JSON_FILE].parent, again.parts())
    again.step, again.cursor, again.batches, again.ema = (
        loop.step,
        loop.data_order["cursor"],
        loop.data_order["batches"],
        loop.loss_ema,
    )
    train(again, TOTAL)
    final = final_state(again)
    assert all(torch.equal(final[name], uninterrupted[name]) for name in final)


@pytest.mark.parametrize("piece", ["noise", "batch_order", "torch_cpu", "python", "numpy", "optimizer", "scheduler"])
def test_every_piece_of_state_is_needed(uninterrupted: dict[str, Any], tmp_path: Path, piece: str) -> None:
    """The exactness above is not luck: spoil any one restored piece and the result differs."""
    run = resumed(tmp_path, 5, perturb=piece)
    train(run, TOTAL)
    final = final_state(run)
    assert any(not torch.equal(final[name], uninterrupted[name]) for name in final if name.startswith("base_model"))


def test_the_files_are_data_only(tmp_path: Path) -> None:
    """safetensors and JSON: nothing is unpickled on restore, and the JSON is plain data."""
    from safetensors.torch import load_file

    run = build(SEED)
    train(run, 2)
    paths = capture(run.parts(), run.loop_state(), tmp_path)
    tree = json.loads(paths[JSON_FILE].read_text())
    assert tree["step"] == 2
    assert tree["data_order"]["cursor"] == 2
    assert set(load_file(str(paths["lora.safetensors"]))) == set(run.params)
    assert "states/optimizer/state/0/exp_avg" in load_file(str(paths["trainer.safetensors"]))
    assert {"$items"} == set(tree["states"]["optimizer"]["state"])  # int keys survive JSON


def test_a_checkpoint_of_another_shape_is_refused(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    run = build(SEED)
    capture(run.parts(), run.loop_state(), tmp_path)
    other = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4)),
        LoraConfig(r=3, lora_alpha=4, target_modules=["0", "3"]),
    )
    params = {name: p for name, p in other.named_parameters() if p.requires_grad}
    shapes = r"checkpoint has torch.float32 \(2, 6\), the model torch.float32 \(3, 6\)"
    with pytest.raises(CheckpointCorrupt, match=shapes):
        restore(tmp_path, TrainerParts(params=params, states=run.parts().states, generators=run.parts().generators))
    with pytest.raises(CheckpointCorrupt, match="generators do not match"):
        restore(tmp_path, TrainerParts(params=run.params, states=run.parts().states, generators={}))
    (tmp_path / JSON_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(CheckpointCorrupt, match="unreadable"):
        restore(tmp_path, run.parts())
