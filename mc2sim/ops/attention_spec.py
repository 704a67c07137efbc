"""Spec of the attention op: IncreFlashAttention decode with page attention, per rank's heads.

Shape keys: ``batch``, ``heads`` and ``kv_heads`` (this rank's), ``head_dim``, ``kv_len``,
``block_size``. The limits are :mod:`mc2sim.limits`' (the ones the kernel checks); tilings
split the batch; nothing crosses ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from mc2sim import limits
from mc2sim.limits import Policy
from mc2sim.ops.spec import (
    OpName,
    OpSpec,
    RealCase,
    one_tensor,
    placed,
    same_on_every_rank,
    torch_dtype,
)
from mc2sim.ops.tp_spec import uniform
from mc2sim.schedule.builders import IfaShape, plan_ifa
from mc2sim.schedule.plan import Plan

if TYPE_CHECKING:
    import torch

    from mc2sim.comm.base import Communicator
    from mc2sim.scenario import Scenario
    from mc2sim.schedule.tiling import Tiling

__all__ = ["IfaSpec"]

_ELEM_BYTES = {"float16": 2, "bfloat16": 2}


class IfaSpec(OpSpec):
    """IncreFlashAttention decode (BSH, page attention) on each rank's heads."""

    op: ClassVar[OpName] = OpName.IFA
    required: ClassVar[tuple[str, ...]] = (
        "batch",
        "heads",
        "kv_heads",
        "head_dim",
        "kv_len",
        "block_size",
    )

    def _check_dims(self, shape: Mapping[str, int], where: str, policy: Policy | None) -> None:
        limits.IFA_BATCH.check(f"{where}.batch", shape["batch"], policy)
        heads = limits.IFA_HEADS.check(f"{where}.heads", shape["heads"], policy)
        kv_heads = shape["kv_heads"]
        limits.KV_HEADS_DIVIDE.check(
            f"{where}.kv_heads",
            kv_heads,
            kv_heads >= 1 and heads % kv_heads == 0,
            f"must divide heads ({heads})",
        )
        limits.IFA_GROUP.check(f"{where}.heads / kv_heads", heads // kv_heads, policy)
        dim = limits.IFA_HEAD_DIM.check(f"{where}.head_dim", shape["head_dim"], policy)
        limits.IFA_PAGED_HIDDEN.check(f"{where}.kv_heads * head_dim", kv_heads * dim, policy)
        size = limits.IFA_BLOCK_SIZE.check(f"{where}.block_size", shape["block_size"], policy)
        align = limits.IFA_BLOCK_ALIGN["float"]
        limits.enforce(
            limits.IFA_BLOCK_ALIGNMENT,
            f"{where}.block_size",
            size,
            size % align == 0,
            f"must be a multiple of {align}",
            policy,
        )

    def plans(self, scenario: Scenario, world: int, tiling: Tiling) -> dict[int, Plan]:
        """Every rank's plan: its heads of every batch, in batch tiles."""
        shape = scenario.effective_shape()
        attention = IfaShape(
            heads=shape["heads"],
            kv_heads=shape["kv_heads"],
            head_dim=shape["head_dim"],
            kv_len=shape["kv_len"],
            elem_bytes=_ELEM_BYTES[scenario.dtype],
            dtype=scenario.dtype,
        )
        first = plan_ifa(
            batch=shape["batch"], shape=attention, tiling=tiling, rank=0, world_size=world
        )
        return same_on_every_rank(first, world)

    def real_case(
        self,
        scenario: Scenario,
        comm: Communicator,
        gen: torch.Generator,
        device: torch.device | None = None,
    ) -> RealCase:
        """This rank's heads of a decode step over a scattered paged cache of ``kv_len`` tokens."""
        import torch

        from mc2sim import golden, ops

        shape = scenario.effective_shape()
        batch, heads, kv_heads = shape["batch"], shape["heads"], shape["kv_heads"]
        dim, kv_len, block = shape["head_dim"], shape["kv_len"], shape["block_size"]
        dtype = torch_dtype(scenario.dtype)
        per_seq = -(-kv_len // block)
        blocks = batch * per_seq + 1  # one spare block, never in the table
        table = torch.randperm(blocks, generator=gen)[: batch * per_seq].reshape(batch, per_seq)
        # every batch holds kv_len tokens, the length its simulated plan is costed at; the last
        # block of each is padding where kv_len is not a multiple of the block size
        lengths = [kv_len] * batch
        query = uniform(gen, batch, 1, heads * dim, dtype=dtype, scale=1.0)
        key_cache = uniform(gen, blocks, block, kv_heads * dim, dtype=dtype, scale=1.0)
        value_cache = uniform(gen, blocks, block, kv_heads * dim, dtype=dtype, scale=1.0)
        table = table.to(torch.int32)
        expected = golden.ifa_paged(
            query, key_cache, value_cache, table, lengths,
            num_heads=heads, num_kv_heads=kv_heads, scale=dim**-0.5, probs_dtype=dtype,
        )  # fmt: skip
        query, key_cache, value_cache, table = placed(device, query, key_cache, value_cache, table)

        return RealCase(
            op=ops.ifa_decode,
            args=(query, key_cache, value_cache, comm),
            kwargs={
                "block_table": table,
                "actual_seq_lengths": lengths,
                "num_heads": heads,
                "num_key_value_heads": kv_heads,
                "block_size": block,
                "scale_value": dim**-0.5,
            },
            output=lambda out: one_tensor(out, "ifa_decode"),
            expected=expected,
        )
