"""Data parallel training on CPU (gloo processes): every sharding equals one process on the concatenated batch.

Contract: with a mean-reduced loss and equal per-rank batches, R ranks stepping on ``x_1 … x_R`` take exactly the
step one process takes on their concatenation — for ``sharding="none"`` (DDP), ``"grad_op"`` (ZeRO-2) and
``"full"`` (FSDP), for sgd, adamw, muon and dion, with clipping, gradient accumulation and adapters. Each rank
starts from a *different* random init (capture broadcasts rank 0's) and trains float64 MLPs whose row counts are
not multiples of the world size (padded shards); the reference is a single process on the whole batches, and
the unsharded ``state_dict`` every rank gathers (parameters and optimizer state) must equal its to 1e-10.

One spawn of two processes runs every default case in turn (``dist_harness.run_ranks``); the tests read its
results. Four processes, inductor and the GPT-2 case are ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_harness import assert_same_state, ddp_runner, make_model, run_ranks, single_process

import graphopt

SGD, ADAMW = "sgd(lr=0.1, momentum=0.9)", "adamw(lr=1e-2)"
MUON, DION = "muon(lr=0.02, adamw_lr=0.01)", "dion(lr=0.02, rank=2, adamw_lr=0.01)"
LORA = "lora(r=2, alpha=4)"


def two_rank_cases(folder: Path) -> dict[str, dict]:
    """The default cases, by name (run in this order: a checkpoint is written before it is loaded)."""
    return {
        "sgd-none": {"methods": [SGD]},
        "sgd-none-per-parameter": {"methods": [SGD], "bucket_mb": 0},
        "adamw-none-raise": {"methods": [ADAMW], "on_nonfinite": None},  # graphopt's default guard
        "sgd-clip-full": {"methods": ["sgd(lr=0.1, max_grad_norm=0.5)"], "sharding": "full"},
        "adamw-grad_op": {"methods": [ADAMW], "sharding": "grad_op", "on_nonfinite": None},
        "adamw-full-per-parameter": {"methods": [ADAMW], "sharding": "full", "bucket_mb": 0, "eval": True},
        "muon-grad_op": {"methods": [MUON], "sharding": "grad_op"},
        "muon-full": {"methods": [MUON], "sharding": "full", "on_nonfinite": None},
        "dion-grad_op": {"methods": [DION], "sharding": "grad_op"},
        "dion-full": {"methods": [DION], "sharding": "full", "on_nonfinite": None},
        "lora-adamw-full": {"methods": [LORA, ADAMW], "sharding": "full"},
        "adamw-grad_op-accumulate": {"methods": [ADAMW], "sharding": "grad_op", "gradient_accumulation_steps": 2},
        "adamw-full-checkpointed": {"methods": [ADAMW], "sharding": "full", "bucket_mb": 0, "model": "residual",
                                    "checkpoint_blocks": True},
        "bytes-adamw-full": {"methods": [ADAMW], "sharding": "full", "model": "wide", "steps": 1},
        "bytes-adamw-grad_op": {"methods": [ADAMW], "sharding": "grad_op", "model": "wide", "steps": 1},
        "guard-skip-grad_op": {"methods": [SGD], "sharding": "grad_op", "model": "sqrt", "steps": 1,
                               "on_nonfinite": "skip"},
        "guard-raise-full": {"methods": [SGD], "sharding": "full", "model": "sqrt", "steps": 1, "on_nonfinite": None},
        "guard-skip-none-poisoned": {"methods": [ADAMW], "poison": (1, 1), "on_nonfinite": "skip"},
        "checkpoint-save": {"methods": [ADAMW], "sharding": "full", "steps": 3, "save": str(folder / "ckpt.pt")},
        "checkpoint-load": {"methods": [ADAMW], "sharding": "full", "start": 3, "steps": 3,
                            "load": str(folder / "ckpt.pt")},
        "batchnorm-sync-buffers": {"runner": ddp_runner, "model": "bn", "sync_buffers": True},
        "batchnorm-own-buffers": {"runner": ddp_runner, "model": "bn", "sync_buffers": False},
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("two_ranks")
    cases = two_rank_cases(folder)
    return {name: results for name, results in zip(cases, run_ranks(list(cases.values()), folder))}


_references: dict[str, tuple] = {}


def reference(name: str, case: dict, load: dict | None = None) -> tuple[dict, list[float]]:
    """The single-process state dict and losses of ``case`` (cached: sharding options do not change them)."""
    key = repr({k: v for k, v in case.items() if k not in ("sharding", "bucket_mb", "eval", "save", "load")}) + \
        str(load is not None)
    if key not in _references:
        m, losses = single_process(case, load)
        _references[key] = (m.state_dict(), losses)
    return _references[key]


def ranks(two_ranks: dict[str, list[dict]], name: str) -> list[dict]:
    results = two_ranks[name]
    for rank, result in enumerate(results):
        if "exception" in result:
            pytest.fail(f"case {name!r}, rank {rank}:\n{result['exception']}")
    return results


CONTRACT = ["sgd-none", "sgd-none-per-parameter", "adamw-none-raise", "sgd-clip-full", "adamw-grad_op",
            "adamw-full-per-parameter", "muon-grad_op", "muon-full", "dion-grad_op", "dion-full", "lora-adamw-full",
            "adamw-grad_op-accumulate", "adamw-full-checkpointed"]


@pytest.mark.parametrize("name", CONTRACT)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, tmp_path: Path, name: str) -> None:
    case = two_rank_cases(tmp_path)[name]
    expected, full_losses = reference(name, case)
    results = ranks(two_ranks, name)
    for result in results:  # parameters and optimizer state, gathered to the unsharded layout
        assert_same_state(result["state"], expected)
    if case.get("gradient_accumulation_steps", 1) == 1:  # each rank's loss is its half's: the mean is the batch's
        for step, loss in enumerate(full_losses):
            assert (results[0]["losses"][step] + results[1]["losses"][step]) / 2 == pytest.approx(loss, abs=1e-10)
        assert results[0]["losses"] != results[1]["losses"]  # the ranks really saw different data
    if any("lora" in m for m in case["methods"]):
        assert any(k.endswith("lora_A") for k in expected)


def test_gradients_are_bucketed_and_each_bucket_reduced_as_soon_as_it_is_ready(two_ranks) -> None:
    one_bucket = ranks(two_ranks, "sgd-none")[0]["graph"]
    assert one_bucket["counts"]["all_reduce"] == 1  # 6 gradients of a tiny MLP: one 25 MiB bucket
    per_parameter = ranks(two_ranks, "sgd-none-per-parameter")[0]["graph"]
    assert per_parameter["counts"]["all_reduce"] == 6  # bucket_mb=0: one collective per gradient
    assert per_parameter["prompt"] == [True] * 6  # each right after its last gradient exists
    assert per_parameter["reduce_before_last_mm"]  # the first starts while the backward pass still runs
    guarded = ranks(two_ranks, "adamw-none-raise")[0]["graph"]
    assert guarded["counts"]["all_reduce"] == 2  # the bucket, and every rank's finiteness verdict


def test_sharded_steps_reduce_scatter_gradients_and_gather_parameters(two_ranks) -> None:
    grad_op = ranks(two_ranks, "adamw-grad_op")[0]["graph"]["counts"]
    assert grad_op["reduce_scatter_tensor"] == 1 and grad_op["all_gather_into_tensor"] == 1  # updated rows gathered
    full = ranks(two_ranks, "adamw-full-per-parameter")[0]["graph"]
    assert full["counts"]["reduce_scatter_tensor"] == 6 and full["prompt"] == [True] * 6
    assert full["counts"]["all_reduce"] == 0
    # gathered before use in the forward (6 buckets) and again in the backward for the two weights it reads
    # (layer 0's input needs no gradient); no full parameter of the forward is kept for the backward pass
    assert full["counts"]["all_gather_into_tensor"] == 8
    assert full["gathered_for_backward"] == {"forward_values_read_by_backward": 0, "backward_gathers": 2}
    # with activation checkpointing the recomputed blocks read the weights in the backward: gathered there too
    checkpointed = ranks(two_ranks, "adamw-full-checkpointed")[0]["graph"]["gathered_for_backward"]
    assert checkpointed["forward_values_read_by_backward"] == 0 and checkpointed["backward_gathers"] >= 4


def test_sharded_bytes_per_rank_are_half(two_ranks, tmp_path: Path) -> None:
    """32-row weights on 2 ranks: no padding, so the shards are exactly half; only the AdamW step counters (one
    float64 per parameter) stay whole on every rank."""
    case = two_rank_cases(tmp_path)["bytes-adamw-full"]
    m, _ = single_process(case)
    param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    state = [v for slots in m.optimizer_state().values() for v in slots.values()]
    state_bytes = sum(v.numel() * v.element_size() for v in state)
    counters = sum(v.numel() * v.element_size() for v in state if v.dim() == 0)
    for result in ranks(two_ranks, "bytes-adamw-full"):
        assert result["param_bytes"] == param_bytes / 2
        assert result["state_bytes"] == (state_bytes - counters) / 2 + counters
    for result in ranks(two_ranks, "bytes-adamw-grad_op"):
        assert result["param_bytes"] == param_bytes  # grad_op keeps whole parameters
        assert result["state_bytes"] == (state_bytes - counters) / 2 + counters


def test_every_rank_reaches_the_same_verdict_on_a_non_finite_gradient(two_ranks, tmp_path: Path) -> None:
    """``√W`` with ``W[0, 0] = 0``: a finite loss and an infinite gradient in row 0 only, which after the
    reduce-scatter is in rank 0's rows alone; rank 1's rows and loss are finite, yet both ranks skip (and with
    "raise" both raise, the step not counted as skipped), leaving the parameters as they were."""
    initial = make_model("sqrt", 100).state_dict()
    for name, policy in (("guard-skip-grad_op", "skip"), ("guard-raise-full", "raise")):
        for result in ranks(two_ranks, name):
            assert result["skipped"] == (1 if policy == "skip" else 0)
            assert len(result["errors"]) == (1 if policy == "raise" else 0)
            torch.testing.assert_close(result["state"]["weight"], initial["weight"], rtol=0, atol=0)
    case = two_rank_cases(tmp_path)["guard-skip-none-poisoned"]  # a NaN input on rank 1 at step 1
    expected, _ = reference("guard-skip-none-poisoned", case)
    for result in ranks(two_ranks, "guard-skip-none-poisoned"):
        assert result["skipped"] == 1
        assert_same_state(result["state"], expected)


def test_sharded_checkpoints_are_unsharded_and_load_on_any_world_size(two_ranks, tmp_path: Path) -> None:
    cases = two_rank_cases(tmp_path)
    saved = ranks(two_ranks, "checkpoint-save")
    first, _ = reference("checkpoint-save", cases["checkpoint-save"])
    assert_same_state(saved[0]["state"], first)  # the layout of a single process: its keys and shapes
    assert saved[0]["state"].keys() == first.keys()
    whole = {**cases["checkpoint-save"], "steps": 6}
    six_steps, _ = reference("six-steps", whole)
    for result in ranks(two_ranks, "checkpoint-load"):  # a sharded model loads it and goes on
        assert_same_state(result["state"], six_steps)
    resumed, _ = reference("checkpoint-load", {**cases["checkpoint-load"]}, load=saved[0]["state"])
    assert_same_state(resumed, six_steps)  # and one process does too


def test_the_forward_outside_the_step_gathers_full_parameters(two_ranks, tmp_path: Path) -> None:
    case = two_rank_cases(tmp_path)["adamw-full-per-parameter"]
    m, _ = single_process(case)
    from dist_harness import case_batches

    with torch.no_grad():
        expected = m.eval()(case_batches(case)[0][0])
    for result in ranks(two_ranks, "adamw-full-per-parameter"):
        torch.testing.assert_close(result["eval"], expected, rtol=0, atol=1e-10)
        assert "torch.no_grad()" in result["eval_error"]  # with gradients: a clear error, not shards


@pytest.mark.parametrize("name", ["batchnorm-sync-buffers", "batchnorm-own-buffers"])
def test_buffers_as_torch_ddp_keeps_them(two_ranks, name: str) -> None:
    """BatchNorm running statistics: ``sync_buffers=True`` equals DDP's ``broadcast_buffers=True`` (rank 0's
    buffers before each forward), ``False`` equals ``broadcast_buffers=False`` (each rank its own)."""
    results = ranks(two_ranks, name)
    for result in results:
        assert result["graphopt"].keys() == result["ddp"].keys()
        for key, value in result["ddp"].items():
            torch.testing.assert_close(result["graphopt"][key], value, rtol=0, atol=1e-10, msg=key)
    mean_0, mean_1 = (r["graphopt"]["1.running_mean"] for r in results)
    assert not torch.equal(mean_0, mean_1)  # the last forward updated each rank's own statistics
    broadcasts = results[0]["graph"]["counts"]["broadcast"]
    assert broadcasts == (2 if name == "batchnorm-sync-buffers" else 0)  # float64 stats, int64 batch count


def test_options_are_checked() -> None:
    model = make_model("mlp", 0)
    with pytest.raises(graphopt.OptionError, match="sharding='full' needs data parallel"):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], sharding="full")
    with pytest.raises(graphopt.OptionError, match="sync_buffers=True needs data parallel"):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], sync_buffers=True)
    with pytest.raises(graphopt.OptionError, match="sharding='zero3' is invalid"):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], sharding="zero3")
    with pytest.raises(graphopt.OptionError, match="bucket_mb=-1 is invalid"):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], bucket_mb=-1)
    with pytest.raises(graphopt.OptionError, match="sync_buffers=1 is invalid"):
        graphopt.compile(model, methods=["sgd(lr=0.1)"], sync_buffers=1)
    if not dist.is_initialized():
        with pytest.raises(graphopt.OptionError, match="init_process_group"):
            graphopt.compile(model, methods=["sgd(lr=0.1)"], process_group=object())


# -- slow: four processes, inductor, a transformers model -----------------------------------------------------
FOUR = {
    "sgd-grad_op": {"methods": [SGD], "sharding": "grad_op"},
    "adamw-full": {"methods": [ADAMW], "sharding": "full", "on_nonfinite": None},
    "muon-grad_op": {"methods": [MUON], "sharding": "grad_op", "on_nonfinite": None},
    "muon-full": {"methods": [MUON], "sharding": "full"},
    "dion-full": {"methods": [DION], "sharding": "full"},
    "sgd-clip-grad_op": {"methods": ["sgd(lr=0.1, max_grad_norm=0.5)"], "sharding": "grad_op"},
    "lora-adamw-grad_op": {"methods": [LORA, ADAMW], "sharding": "grad_op"},
    "lora-sgd-clip-full": {"methods": [LORA, "sgd(lr=0.1, max_grad_norm=0.5)"], "sharding": "full"},
    "bytes-adamw-full": {"methods": [ADAMW], "sharding": "full", "model": "wide", "steps": 1},
}


@pytest.mark.slow
def test_four_ranks_equal_one_process(tmp_path: Path) -> None:
    """The same contract on 4 processes (the MLP's 10-, 16- and 3-row weights: padded shards, and rank 3 holds only
    padding of the 3-row head); a 2-rank checkpoint loads on 4; bytes per rank are a quarter."""
    saver = {"methods": [ADAMW], "sharding": "full", "steps": 3, "save": str(tmp_path / "two.pt")}
    run_ranks([saver], tmp_path, world=2)
    cases = {**FOUR, "checkpoint-from-two": {"methods": [ADAMW], "sharding": "grad_op", "start": 3, "steps": 3,
                                             "load": str(tmp_path / "two.pt")}}
    results = dict(zip(cases, run_ranks([{**c, "world": 4} for c in cases.values()], tmp_path, world=4)))
    for name, case in cases.items():
        if name.startswith("bytes"):
            continue
        expected = single_process({**case, "start": 0, "steps": 6} if "load" in case else case)[0].state_dict()
        for result in results[name]:
            assert "exception" not in result, result.get("exception")
            assert_same_state(result["state"], expected)
    m, _ = single_process(FOUR["bytes-adamw-full"])
    param_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    for result in results["bytes-adamw-full"]:
        assert result["param_bytes"] == param_bytes / 4


@pytest.mark.slow
def test_two_ranks_inductor(tmp_path: Path) -> None:
    """The contract with the step compiled by inductor (collectives inside the compiled graph, compute and
    communication reordered for overlap), for each sharding and dion, with graphopt's default guard."""
    cases = [{"methods": [ADAMW], "sharding": s, "backend": "inductor", "on_nonfinite": None}
             for s in ("none", "grad_op", "full")]
    cases.append({"methods": [DION], "sharding": "full", "backend": "inductor"})
    for case, results in zip(cases, run_ranks(cases, tmp_path)):
        expected = single_process(case)[0].state_dict()
        for result in results:
            assert "exception" not in result, result.get("exception")
            assert_same_state(result["state"], expected)


@pytest.mark.slow
def test_two_ranks_gpt2_with_sora_sharded(tmp_path: Path) -> None:
    """Tiny HF GPT-2 with SoRA on its Conv1D projections (a post-update rule: the gates' proximal step) under
    grad_op, float64, 1e-9 after 4 steps."""
    pytest.importorskip("transformers")
    case = {"methods": ["sora(r=4, targets=['*.attn.c_attn', '*.mlp.c_fc'])", ADAMW], "model": "gpt2",
            "sharding": "grad_op"}
    (results,) = run_ranks([case], tmp_path)
    expected = single_process(case)[0].state_dict()
    assert any(name.endswith("sora_gate") for name in expected)
    for result in results:
        assert "exception" not in result, result.get("exception")
        assert_same_state(result["state"], expected, atol=1e-9)
