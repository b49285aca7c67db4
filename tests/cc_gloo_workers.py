"""Worker processes for the multi-process gloo tests (spawned by test_gloo.py).

They live in an importable module because ``torch.multiprocessing.spawn`` pickles the
worker function by reference. Each worker checks its results against the uncompressed
``torch.distributed`` collective on the same data and saves a summary for the parent.
"""

import datetime
import os
import time

import torch
import torch.distributed as dist

from compressed_comm import (
    CommError,
    CompressedGroup,
    CompressionConfig,
    wrap_process_group,
)

STEPS = 6
BOUND = {"identity": 0.0, "binary": 0.3}


def exit_after_teardown():
    """End a worker whose results are saved: destroy the process groups, then exit without
    interpreter finalisation, where a gloo thread dropping the last reference to a tensor
    aborts the process ("terminate called without an active exception",
    pytorch/pytorch#190489; seen here only under load)."""
    dist.destroy_process_group()
    os._exit(0)


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _raw_all_gather(x):
    outs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, x)
    return outs


def _raw_all_to_all(x):
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def _check(errors, name, got, want, codec):
    err = _rel(got, want)
    errors.setdefault(name, []).append(err)
    if codec == "identity":
        assert torch.equal(got, want), f"{name}: identity codec must be exact (error {err})"
    else:
        assert err < BOUND[codec], f"{name}: error {err} above {BOUND[codec]}"


def _lock_step(group, stream):
    """Receivers' references for each origin equal the origin's own (raw all-gather of them)."""
    enc = {s.name: s for s in group.session if s.role == "encoder"}[stream]
    mine = _raw_all_gather(enc.reference.contiguous())
    for s in group.session:
        if s.role == "decoder" and s.name == stream:
            assert torch.equal(s.reference, mine[s.origin]), f"{stream}: origin {s.origin}"


def _uneven_rows(origin, step):
    """Rank ``origin``'s (2 + origin, 6) tensor at ``step``, known to every rank."""
    base = torch.randn(2 + origin, 6, generator=torch.Generator().manual_seed(100 + origin))
    return base * (1 + 0.05 * step)


def collectives_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    summary = {}
    try:
        for codec in ("identity", "binary"):
            cfg = CompressionConfig(codec=codec)
            group = CompressedGroup(None, cfg, timeout=30)
            wrapped = wrap_process_group(config=cfg, timeout=30)
            assert dist.get_backend(wrapped) == "compressed_comm"
            gen = torch.Generator().manual_seed(rank)
            x = torch.randn(8, 6, generator=gen)
            y = torch.randn(3 * world, 6, generator=gen).half()
            errors = {}
            for step in range(STEPS):
                x = x + 0.05 * torch.randn(8, 6, generator=gen)
                y = (y.float() + 0.05 * torch.randn(3 * world, 6, generator=gen)).half()
                nxt, prv = (rank + 1) % world, (rank - 1) % world
                raw_x, raw_y = _raw_all_gather(x), _raw_all_to_all(y)
                raw_prev = raw_x[prv]

                # CompressedGroup over the default group
                for o, t in enumerate(group.all_gather(x, stream="kv")):
                    _check(errors, "group.all_gather", t, raw_x[o], codec)
                for o, t in enumerate(group.ring_pass(x, stream="kv")):
                    _check(errors, "group.ring_pass", t, raw_x[o], codec)
                _check(errors, "group.all_to_all", group.all_to_all(y, stream="heads"), raw_y,
                       codec)
                h = group.isend(x, nxt, stream="patch")
                _check(errors, "group.recv", group.recv(x, prv, stream="patch"), raw_prev, codec)
                h.wait()
                group.step()

                # the drop-in wrapper through plain torch.distributed calls
                outs = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(outs, x, group=wrapped)
                for o, t in enumerate(outs):
                    _check(errors, "dist.all_gather", t, raw_x[o], codec)
                flat = torch.empty(world * 8, 6)
                dist.all_gather_into_tensor(flat, x, group=wrapped)
                for o, t in enumerate(flat.chunk(world)):
                    _check(errors, "dist.all_gather_into_tensor", t, raw_x[o], codec)
                a2a = torch.empty_like(y)
                dist.all_to_all_single(a2a, y, group=wrapped)
                _check(errors, "dist.all_to_all_single", a2a, raw_y, codec)
                # uneven splits and a different number of rows on every rank
                ins = [1 + rank + dst for dst in range(world)]
                outs_sizes = [1 + src + rank for src in range(world)]
                z = (y.float()[:1].expand(sum(ins), 6) * torch.arange(
                    1, sum(ins) + 1).view(-1, 1) / 7).contiguous()
                raw_z = torch.empty(sum(outs_sizes), 6)
                dist.all_to_all_single(raw_z, z, outs_sizes, ins)
                got_z = torch.empty(sum(outs_sizes), 6)
                dist.all_to_all_single(got_z, z, outs_sizes, ins, group=wrapped)
                _check(errors, "dist.all_to_all_single uneven", got_z, raw_z, codec)
                # an all-gather of a different number of rows from every rank
                every = [_uneven_rows(o, step) for o in range(world)]
                gathered = [torch.empty_like(t) for t in every]
                dist.all_gather(gathered, every[rank], group=wrapped)
                for o, t in enumerate(gathered):
                    _check(errors, "dist.all_gather uneven", t, every[o], codec)
                recv = torch.empty_like(x)
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, wrapped),
                                               dist.P2POp(dist.irecv, recv, prv, wrapped)])
                for req in reqs:
                    req.wait()
                _check(errors, "dist.batch_isend_irecv", recv, raw_prev, codec)
                if rank == 0:
                    dist.send(x, 1, group=wrapped)
                elif rank == 1:
                    got = torch.empty_like(x)
                    dist.recv(got, 0, group=wrapped)
                    _check(errors, "dist.send/recv", got, raw_x[0], codec)
                # passthrough: all-reduce and an int64 broadcast, untouched
                total = torch.full((3,), float(rank))
                dist.all_reduce(total, group=wrapped)
                assert torch.equal(total, torch.full((3,), float(sum(range(world)))))
                ints = torch.arange(4) if rank == 0 else torch.zeros(4, dtype=torch.int64)
                dist.broadcast(ints, 0, group=wrapped)
                assert torch.equal(ints, torch.arange(4))
                wrapped.step()
            _lock_step(group, "all_gather:kv")
            sent = wrapped.stats().select("encoder")
            summary[codec] = dict(max_errors={k: max(v) for k, v in errors.items()},
                                  wrapper_ratio=sent.ratio, group_ratio=group.stats().ratio)
        torch.save(summary, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_after_teardown()


def dead_peer_worker(rank, world, init_file, out_dir):
    """Rank 1 never sends on one stream, then dies; rank 0 must get errors, not hang."""
    _init(rank, world, init_file)
    group = CompressedGroup(None, CompressionConfig(), timeout=2.0)
    dist.barrier()  # rank 1 dies 4 s after rank 0 is ready, however loaded the machine
    if rank == 1:
        time.sleep(4.0)
        os._exit(0)  # die without a word
    outcomes = []
    for call in (lambda: group.recv(torch.zeros(4, 4), 1, stream="never-sent"),
                 lambda: group.recv(torch.zeros(4, 4), 1, stream="after-failure"),
                 lambda: (time.sleep(3.0), group.new_session())):
        t0 = time.monotonic()
        try:
            call()
            outcomes.append(("no error", "", time.monotonic() - t0))
        except CommError as e:
            outcomes.append((type(e).__name__, str(e), time.monotonic() - t0))
    torch.save(outcomes, os.path.join(out_dir, "rank0.pt"))
    os._exit(0)  # the peer is gone: skip the collective teardown


def _tensor(rank, request, step, shape=(16, 8)):
    gen = torch.Generator().manual_seed(1000 * request + 10 * step + rank)
    return torch.randn(shape, generator=gen) + 100 * request


def serving_faults_worker(rank, world, init_file, out_dir):
    """Through the drop-in group: an abandoned request, a step() skipped on one rank, and a
    loop that never calls step(). Records outcomes for the parent."""
    import warnings

    _init(rank, world, init_file)
    out = {}
    try:
        pg = wrap_process_group(None, CompressionConfig(codec="identity"), timeout=20.0,
                                max_calls_per_step=4)
        # 1. request A abandoned by the receiver after 3 of 8 messages
        if rank == 0:
            works = []
            for s in range(8):
                works.append(dist.isend(_tensor(0, 0, s), 1, group=pg))
                pg.step()
        else:
            got = []
            for _ in range(3):
                buf = torch.empty(16, 8)
                dist.recv(buf, 0, group=pg)
                got.append(buf)
                pg.step()
            out["a_first3"] = all(torch.equal(g, _tensor(0, 0, s)) for s, g in enumerate(got))
        pg.new_session()
        if rank == 0:
            out["a_cancelled"] = _raises(works[7].wait)
            for s in range(8):
                dist.send(_tensor(0, 1, s), 1, group=pg)
                pg.step()
        else:
            ok = True
            for s in range(8):
                buf = torch.empty(16, 8)
                dist.recv(buf, 0, group=pg)
                ok &= torch.equal(buf, _tensor(0, 1, s))
                pg.step()
            out["b_exact"] = ok
        pg.new_session()
        # 2. rank 1 skips one step(): a Python exception on every rank (rank 0's step()
        #    meets rank 1's next all-gather), then recovery
        outs = [torch.empty(16, 8) for _ in range(world)]
        dist.all_gather(outs, _tensor(rank, 2, 0), group=pg)
        out["skipped_step"] = _raises(pg.step if rank == 0 else lambda: dist.all_gather(
            outs, _tensor(rank, 2, 1), group=pg))
        pg.new_session()
        dist.all_gather(outs, _tensor(rank, 3, 0), group=pg)
        out["recovered"] = all(torch.equal(outs[o], _tensor(o, 3, 0)) for o in range(world))
        # 2b. the same over send/recv, where gloo would abort on a message longer than the
        #     receive buffer: the sender skips step() and sends a keyframe of a new stream
        pg = wrap_process_group(None, CompressionConfig(codec="binary"), timeout=20.0)
        buf = torch.empty(16, 8)
        for s in range(2):
            if rank == 0:
                dist.send(_tensor(0, 5, s), 1, group=pg)
                if s == 0:
                    pg.step()
            else:
                dist.recv(buf, 0, group=pg)
                pg.step()
        if rank == 0:
            dist.send(_tensor(0, 5, 2), 1, group=pg)  # a full keyframe: rank 1 expects step 2
        else:
            out["p2p_skipped_step"] = _raises(lambda: dist.recv(buf, 0, group=pg))
        pg = wrap_process_group(None, CompressionConfig(codec="identity"), timeout=20.0,
                                max_calls_per_step=4)
        # 3. no step() at all: past max_calls_per_step calls pass through, results exact
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = True
            for s in range(10):
                dist.all_gather(outs, _tensor(rank, 4, s), group=pg)
                ok &= all(torch.equal(outs[o], _tensor(o, 4, s)) for o in range(world))
        out["no_step_exact"] = ok
        out["no_step_warned"] = sum("without step()" in str(w.message) for w in caught)
        out["streams"] = len(pg.compressed.session)
        dist.barrier()
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()


def _raises(call):
    """The name and message of what ``call`` raises, or None."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return type(e).__name__, str(e)
    return None


def _drifting(rank, step, shape):
    """Rank ``rank``'s tensor at ``step``: a fixed base plus a small drift per step."""
    gen = torch.Generator().manual_seed(100 + rank)
    base, drift = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return base + 0.05 * step * drift


def reduce_worker(rank, world, init_file, out_dir):
    """dist.all_reduce / all_reduce_coalesced / reduce_scatter_tensor through the drop-in
    group (reduce=True) against the exact gloo reduction, what passes through, and a
    tensor-parallel MLP (parallelize_module) with DTensor's reductions compressed."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    from adapters.xdit import enable_compression

    _init(rank, world, init_file)
    out = {}
    try:
        for codec in ("identity", "int8"):
            pg = wrap_process_group(config=CompressionConfig(codec=codec), reduce=True)
            errors = {}
            for step in range(STEPS):
                x = _drifting(rank, step, (12, 8))
                exact = x.clone()
                dist.all_reduce(exact)
                got = x.clone()
                dist.all_reduce(got, group=pg)
                errors.setdefault("all_reduce sum", []).append(_rel(got, exact))
                avg = x.clone()
                dist.all_reduce(avg, op=dist.ReduceOp.AVG, group=pg)
                errors.setdefault("all_reduce avg", []).append(_rel(avg, exact / world))
                pair = [x.clone(), 2 * x[:5].clone()]
                dist.all_reduce_coalesced(pair, group=pg)
                errors.setdefault("all_reduce_coalesced", []).append(
                    max(_rel(pair[0], exact), _rel(pair[1], 2 * exact[:5])))
                big = torch.cat([x] * world)
                mine = torch.empty_like(x)
                dist.reduce_scatter_tensor(mine, big, group=pg)
                errors.setdefault("reduce_scatter_tensor", []).append(_rel(mine, exact))
                top = x.clone()  # MAX and integer tensors pass through, exactly
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=pg)
                want = x.clone()
                dist.all_reduce(want, op=dist.ReduceOp.MAX)
                count = torch.tensor([rank + step])
                dist.all_reduce(count, group=pg)
                errors.setdefault("passthrough", []).append(
                    float(not torch.equal(top, want)) + abs(int(count) - (
                        world * step + world * (world - 1) // 2)))
                same = [torch.empty_like(got) for _ in range(world)]
                dist.all_gather(same, got)  # every rank holds the same bits
                errors.setdefault("ranks differ", []).append(
                    float(not all(torch.equal(s, got) for s in same)))
                pg.step()
            out[codec] = {k: max(v) for k, v in errors.items()}
            out[codec]["streams"] = len(pg.compressed.session)
        off = wrap_process_group(config=CompressionConfig(codec="int8"))  # reduce=False
        x = _drifting(rank, 0, (12, 8))
        exact, got = x.clone(), x.clone()
        dist.all_reduce(exact)
        dist.all_reduce(got, group=off)
        out["off"] = dict(exact=torch.equal(got, exact), streams=len(off.compressed.session))

        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.GELU(),
                                  torch.nn.Linear(48, 16))
        mesh = init_device_mesh("cpu", (world,))
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        results = {}
        for codec in ("raw", "identity", "int8"):
            model = parallelize_module(copy.deepcopy(mlp), mesh, plan)
            handle = None if codec == "raw" else enable_compression(
                model, CompressionConfig(codec=codec), reduce=True)
            with torch.no_grad():
                results[codec] = [model(_drifting(0, step, (6, 16))) for step in range(STEPS)]
            if handle is not None:
                out[f"tp {codec} points"] = handle.points
                out[f"tp {codec} streams"] = len(handle.stats().streams)
                handle.disable()
        for codec in ("identity", "int8"):
            out[f"tp {codec}"] = max(_rel(a, b) for a, b in zip(results[codec], results["raw"]))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_after_teardown()


def _split_matrix(step, world):
    """Rows each rank sends to each rank at ``step`` (zeros included; every rank draws the
    same). Steps 0 and 1 are the issue's example on 2 ranks: [2, 3] / [3, 4], then [4, 1] /
    [1, 6]."""
    if world == 2 and step < 2:
        return [[[2, 3], [3, 4]], [[4, 1], [1, 6]]][step]
    return torch.randint(0, 5, (world, world),
                         generator=torch.Generator().manual_seed(step)).tolist()


def split_changes_worker(rank, world, init_file, out_dir, steps=100):
    """dist.all_to_all_single through the drop-in group with splits that change at every
    step, against the uncompressed all-to-all; stream count and reference memory per step."""
    _init(rank, world, init_file)
    out = {}
    try:
        for codec in ("identity", "int8"):
            pg = wrap_process_group(None, CompressionConfig(codec=codec), timeout=30.0)
            errors, streams, memory = [], [], []
            for step in range(steps):
                splits = _split_matrix(step, world)
                ins = splits[rank]
                outs = [splits[src][rank] for src in range(world)]
                x = torch.randn(sum(ins), 16, generator=torch.Generator().manual_seed(
                    1000 * step + rank)).to(torch.float16)
                want = torch.empty(sum(outs), 16, dtype=torch.float16)
                dist.all_to_all_single(want, x, outs, ins)
                got = torch.empty_like(want)
                dist.all_to_all_single(got, x, outs, ins, group=pg)
                errors.append(_rel(got, want) if want.numel() else 0.0)
                if codec == "identity":
                    assert torch.equal(got, want), f"step {step}: splits {splits}"
                streams.append(len(pg.compressed.session))
                memory.append(pg.compressed.session.reference_bytes)
                pg.step()
            out[codec] = dict(max_error=max(errors), streams=max(streams), memory=max(memory))
        dist.barrier()
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    exit_after_teardown()


def _fault_outcome(call):
    """(error type, message, seconds) of ``call``, or (None, "", seconds)."""
    t0 = time.monotonic()
    try:
        call()
        return None, "", time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return type(e).__name__, str(e), time.monotonic() - t0


def control_plane_worker(rank, world, init_file, out_dir):
    """Over gloo: faults one rank sees in a steady step (every rank raises at once and
    new_session() recovers), control traffic per step, then the patterns that aborted the
    process before, each on a group of its own (a timeout breaks a gloo group)."""
    _init(rank, world, init_file)
    out = {"faults": {}}
    spare = [dist.new_group(backend="gloo") for _ in range(2)]
    try:
        g = CompressedGroup(None, CompressionConfig(codec="int8"), timeout=30.0)
        for request, fault in enumerate(("none", "nan", "user", "shape")):
            exchanges = []
            for step in range(4):
                x = _drifting(rank, step, (16, 8))
                if step == 3 and rank == 1 and fault == "nan":
                    x[0, 0] = float("nan")
                if step == 3 and rank == 1 and fault == "shape":
                    x = _drifting(rank, step, (12, 8))

                def one_step():
                    if step == 3 and rank == 1 and fault == "user":
                        try:
                            raise RuntimeError("boom in the caller's code")
                        except RuntimeError as e:
                            g.fail(e)
                            raise
                    g.all_gather(x, stream="kv")
                    g.all_to_all(torch.cat([x] * world), stream="a2a")
                    g.step()
                before = g.handshake_messages_sent
                outcome = _fault_outcome(one_step)
                exchanges.append((g.handshake_messages_sent - before) // (world - 1))
                if outcome[0] is not None:
                    break
            g.new_session()
            got = g.all_gather(_drifting(rank, 0, (16, 8)), stream="kv")
            exact = all(_rel(got[o], _drifting(o, 0, (16, 8))) < 0.01 for o in range(world))
            out["faults"][fault] = dict(outcome=outcome, exchanges=exchanges, recovered=exact)
            g.new_session()
        # handshake=True on one rank only: a Python error on both, after the timeout
        one = CompressedGroup(spare[0], CompressionConfig(codec="int8",
                                                          handshake=rank == 0), timeout=3.0)
        out["one_handshake"] = _fault_outcome(
            lambda: one.all_gather(_drifting(rank, 0, (16, 8)), stream="k"))
        # the drop-in group: step() skipped on one rank when the step's calls reach the cap
        pg = wrap_process_group(spare[1], CompressionConfig(codec="int8"), timeout=3.0,
                                max_calls_per_step=2)
        outs = [torch.empty(16, 8) for _ in range(world)]

        def capped():
            for call in range(2):
                dist.all_gather(outs, _drifting(rank, call, (16, 8)), group=pg)
            if rank == 0:
                pg.step()
            dist.all_gather(outs, _drifting(rank, 2, (16, 8)), group=pg)
        out["skipped_step_at_cap"] = _fault_outcome(capped)
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # groups left broken by timeouts on purpose: no collective teardown


def rebuild_worker(rank, world, init_file, out_dir):
    """A receiver times out because its sender is slow (gloo's connection does not survive
    it); new_session(rebuild=True) on every rank makes fresh connections, and the next
    request is right. The group runs on a group of its own, so the world group is intact."""
    _init(rank, world, init_file)
    out = {}
    try:
        pg = dist.new_group(backend="gloo")
        g = CompressedGroup(pg, CompressionConfig(codec="int8"), timeout=2.0)
        g.all_gather(_drifting(rank, 0, (16, 8)), stream="warm")  # a working group first
        if rank == 0:
            out["timed_out"] = _fault_outcome(lambda: g.recv(torch.empty(16, 8), 1, stream="p"))
        else:
            time.sleep(3.0)  # slower than the receiver's timeout
            out["timed_out"] = _fault_outcome(lambda: g.send(_drifting(1, 0, (16, 8)), 0,
                                                             stream="p"))
            if out["timed_out"][0] is None:  # the send went out: the next call finds the break
                out["timed_out"] = _fault_outcome(lambda: g.all_gather(
                    _drifting(rank, 1, (16, 8)), stream="warm"))
        t0 = time.monotonic()
        g.new_session(rebuild=True)
        out["rebuild_s"] = time.monotonic() - t0
        errors = []
        for step in range(3):
            got = g.all_gather(_drifting(rank, step, (16, 8)), stream="kv")
            errors += [_rel(got[o], _drifting(o, step, (16, 8))) for o in range(world)]
            if rank == 0:
                g.send(_drifting(0, step, (16, 8)), 1, stream="q")
            else:
                errors.append(_rel(g.recv(torch.empty(16, 8), 0, stream="q"),
                                   _drifting(0, step, (16, 8))))
            g.step()
        out["after"] = max(errors)
        dist.barrier()  # the world group was never the broken one
        out["world_ok"] = True
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the broken group is left to the process's end
