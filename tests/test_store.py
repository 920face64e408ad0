"""The shard store's update: in place (a large shard batch by batch), and still
all-or-nothing and safe for readers."""

import asyncio
import json

import grpc
import jax
import numpy as np
import pytest

from psfw.base.errors import WireError
from psfw.protocol.messages import UpdateHeader
from psfw.services.kernel import UpdateKernel
from psfw.services.store import ShardStore

pytestmark = pytest.mark.unit

ADAM = json.dumps({"name": "adam", "learning_rate": 0.01})
SLICES = 6


def _grads(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {("w", i): rng.normal(size=256).astype(np.float32) for i in range(SLICES)}


def _head(step: int) -> UpdateHeader:
    return UpdateHeader(wait_s=5.0, group=0, step=step, process=0, workers=1, rows=2, workers_per_group=1, staleness=-1)


def _buffers(store: ShardStore, keys) -> set[int]:
    """Where the slices' values and optimizer state live (XLA may swap buffers
    between a slice's value and its state when it writes in place)."""
    arrays = [store.values[k] for k in keys] + jax.tree.leaves([store.opt_state[k] for k in keys])
    return {a.unsafe_buffer_pointer() for a in arrays}


async def _store(batch_bytes: int, **options) -> ShardStore:
    store = ShardStore(update_batch_bytes=batch_bytes, **options)
    initial = {("w", i): np.linspace(-1, 1, 256, dtype=np.float32) * (i + 1) for i in range(SLICES)}
    await store.put(initial, ADAM)
    return store


@pytest.mark.asyncio
async def test_a_shard_updated_batch_by_batch_in_place_equals_one_jitted_update():
    """Six slices in batches of two (donated, in place) end where one batch ends."""
    whole, batched = await _store(1 << 30), await _store(2 * 256 * 4)
    assert len(batched.kernel.batches(batched.specs)) == 3 and len(whole.kernel.batches(whole.specs)) == 1
    before = _buffers(batched, batched.values)
    for step in range(3):
        for store in (whole, batched):
            await store.update(_head(step), _grads(step))
    assert batched.digest() == whole.digest()  # values, optimizer state, versions, steps
    assert _buffers(batched, batched.values) == before, "with no reader, batches are updated where they are"


@pytest.mark.asyncio
async def test_a_reader_keeps_its_values_while_the_shard_updates_in_place():
    """A Get's snapshot (an answer still being sent) is never written over: the
    batches it holds get new buffers, the others are updated in place."""
    store = await _store(256 * 4)
    await store.update(_head(0), _grads(0))
    step, held, _ = await store.read([("w", 0), ("w", 3)], 0, 1, 5.0)
    copies = {k: np.array(v) for k, v in held.items()}
    free = [k for k in store.values if k not in held]
    before = _buffers(store, free)
    await store.update(_head(1), _grads(1))
    for key, value in held.items():
        assert not value.is_deleted()
        np.testing.assert_array_equal(np.asarray(value), copies[key])
        assert not np.array_equal(np.asarray(store.values[key]), copies[key])
    assert _buffers(store, free) == before
    assert step == 1 and store.group_step(0) == 2


@pytest.mark.asyncio
async def test_a_small_shard_updates_in_place_and_a_refused_update_changes_nothing():
    """One batch, no reader: values and optimizer state are updated where they are;
    a NaN makes the same in-place call hand back the old values and state, so the
    refusal leaves the shard as it was, and the step can still be made."""
    store, fresh = await _store(1 << 30), await _store(1 << 30)
    await store.update(_head(0), _grads(0))
    before, digest = _buffers(store, store.values), store.digest()
    grads = _grads(1)
    grads[("w", 2)][5] = np.nan
    with pytest.raises(WireError, match="gradient of w\\[2\\] has NaN or Inf"):
        await store.update(_head(1), grads)
    assert store.digest() == digest
    await store.update(_head(1), _grads(1))
    assert _buffers(store, store.values) == before, "updated where they are"
    for step in range(2):
        await fresh.update(_head(step), _grads(step))
    assert store.digest() == fresh.digest()


@pytest.mark.asyncio
async def test_a_nonfinite_gradient_in_the_last_batch_changes_no_batch():
    store = await _store(256 * 4)
    await store.update(_head(0), _grads(0))
    digest = store.digest()
    grads = _grads(1)
    grads[("w", SLICES - 1)][7] = np.inf
    with pytest.raises(WireError) as refused:
        await store.update(_head(1), grads)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or Inf" in refused.value.message
    assert store.digest() == digest
    await store.update(_head(1), _grads(1))  # the step can still be made
    assert store.group_step(0) == 2


@pytest.mark.asyncio
async def test_an_update_that_fails_halfway_leaves_a_shard_that_refuses_to_serve(tmp_path):
    """Batches written in place cannot be taken back: the shard says so (DATA_LOSS)
    to every request and never checkpoints that state, until a checkpoint is loaded."""

    class FailsOnTheThirdBatch(UpdateKernel):
        calls = 0

        def run(self, in_place, *args):
            self.calls += 1
            if self.calls == 3:
                raise MemoryError("out of memory in XLA")
            return super().run(in_place, *args)

    store = await _store(256 * 4, checkpoints=tmp_path, make_kernel=FailsOnTheThirdBatch)
    with pytest.raises(WireError) as failed:
        await store.update(_head(0), _grads(0))
    assert failed.value.code == grpc.StatusCode.DATA_LOSS and "MemoryError" in failed.value.message
    for attempt in (
        store.update(_head(0), _grads(0)),
        store.read([("w", 0)], 0, 0, 1.0),
        store.put({("w", 9): np.zeros(4, np.float32)}, ADAM),
    ):
        with pytest.raises(WireError) as refused:
            await attempt
        assert refused.value.code == grpc.StatusCode.DATA_LOSS and "restart it" in refused.value.message
    await store.flush_checkpoints(final=True)
    assert not list(tmp_path.iterdir()), "a damaged state is never checkpointed"


@pytest.mark.asyncio
async def test_an_update_that_fails_before_xla_ran_leaves_the_shard_serving():
    """A failure before anything was donated (a trace or compile error) is an
    INTERNAL error of that update, not damage: the values are intact."""

    class CompilesOnce(UpdateKernel):
        broken = False

        def run(self, in_place, *args):
            if self.broken:
                raise RuntimeError("XLA could not compile the update")
            return super().run(in_place, *args)

    store = await _store(1 << 30, make_kernel=CompilesOnce)
    await store.update(_head(0), _grads(0))
    digest = store.digest()
    store.kernel.broken = True
    with pytest.raises(WireError) as failed:
        await store.update(_head(1), _grads(1))
    assert failed.value.code == grpc.StatusCode.INTERNAL and not store.damage
    assert store.digest() == digest
    store.kernel.broken = False
    await store.update(_head(1), _grads(1))
    assert store.group_step(0) == 2


@pytest.mark.asyncio
async def test_a_step_that_cannot_be_added_up_fails_its_waiters_and_can_be_sent_again():
    """Contributions that cannot be added up (here a slice taken out of one by hand:
    validation and the Put check keep it from happening otherwise) fail every waiter
    at once, never leave the step full but unapplied, and the step can be sent again."""
    store = await _store(1 << 30)
    head = dict(group=0, step=0, workers=1, rows=2, workers_per_group=2, staleness=-1)
    waiting = asyncio.create_task(store.update(UpdateHeader(wait_s=5.0, process=0, **head), _grads(0)))
    for _ in range(100):
        if store.groups.get(0) and store.groups[0].round:
            break
        await asyncio.sleep(0.02)
    del store.groups[0].round.contributions[0].sums[("w", 3)]  # process 0's sums lack a slice the shard holds
    with pytest.raises(WireError) as failed:
        await store.update(UpdateHeader(wait_s=5.0, process=1, **head), _grads(0))
    assert failed.value.code == grpc.StatusCode.INTERNAL and "group 0 step 0 failed" in failed.value.message
    with pytest.raises(WireError) as also:
        await asyncio.wait_for(waiting, 2.0)
    assert also.value is failed.value or also.value.message == failed.value.message
    assert store.groups[0].round is None and store.group_step(0) == 0 and not store.damage
    await asyncio.gather(*(store.update(UpdateHeader(wait_s=5.0, process=p, **head), _grads(0)) for p in (0, 1)))
    assert store.group_step(0) == 1
