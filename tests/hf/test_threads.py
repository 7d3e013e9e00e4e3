"""One patched model run from several threads at once gets stock's numbers on every call: nn.DataParallel's own
replica path (each module's `_replicate_for_data_parallel`, replicas run in threads), a training thread beside
a label-free (logits, generate) thread on ONE model, and real nn.DataParallel on two GPUs where there are two.
Per-call state lives in the call (gather.py: per thread), and a replica's objects serve the replica
(replicas.py)."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import hf_fusedce
from hf_fusedce.testing import rel_err, tiny_batch, tiny_llama

CALLS = 30
BATCHES = [tiny_batch(seed=s, seq=12) for s in range(4)]


def cpu_replicas(model, scales):
    """torch.nn.parallel.replicate's steps on CPU: every module's own `_replicate_for_data_parallel()`, children
    rewired, each parameter set on replica j as a plain non-leaf tensor (DataParallel's broadcast copy; here
    `p * scales[j]`, so a replica that ran the original's weights would give another loss)."""
    modules = list(model.modules())
    index = {m: i for i, m in enumerate(modules)}
    copies = [[m._replicate_for_data_parallel() for m in modules] for _ in scales]
    params = [{p: p * s for p in model.parameters()} for s in scales]  # tied weights stay one tensor
    for i, module in enumerate(modules):
        for j in range(len(scales)):
            replica = copies[j][i]
            for key, child in module._modules.items():
                setattr(replica, key, None if child is None else copies[j][index[child]])
            for key, p in module._parameters.items():
                if p is None:
                    replica._parameters[key] = None
                else:
                    setattr(replica, key, params[j][p])
    return [c[0] for c in copies]


def _in_threads(jobs):
    """Run each job in its own thread, started together; the results in order (a job's exception re-raised)."""
    results, start = [None] * len(jobs), threading.Barrier(len(jobs))

    def run(i):
        start.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _replica_jobs(model, call):
    """One DataParallel step: fresh replicas (scales 1.0 and 1.1), replica j on batch (call + j), the summed
    loss back to the original parameters, as DataParallel's gather and backward do."""
    scales = (1.0, 1.1)
    replicas = cpu_replicas(model, scales)
    batches = [BATCHES[(call + j) % len(BATCHES)] for j in range(len(scales))]
    jobs = [lambda r=r, b=b: r(input_ids=b[0], labels=b[1]).loss for r, b in zip(replicas, batches)]
    return jobs


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_dataparallel_replicas_in_threads_get_stock_losses_and_gradients(tie):
    stock = tiny_llama(tie=tie)
    model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
    for call in range(CALLS):
        expected = [job() for job in _replica_jobs(stock, call)]  # stock, one replica after the other
        stock.zero_grad(set_to_none=True)
        sum(expected).backward()
        losses = _in_threads(_replica_jobs(model, call))
        model.zero_grad(set_to_none=True)
        sum(losses).backward()
        for ours, ref in zip(losses, expected):
            assert rel_err(ours.detach(), ref.detach()) <= 1e-5, call
        for (name, p), q in zip(model.named_parameters(), stock.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-5, (call, name)


def test_training_thread_beside_a_logits_thread_on_one_model():
    """A training thread (labels: the fused loss) and a label-free thread (logits, then greedy generate) share
    one model: every loss, every logits tensor and every generated sequence is stock's."""
    stock = tiny_llama()
    model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
    ids, labels = BATCHES[0]
    prompt = BATCHES[1][0][:, :5]
    with torch.no_grad():
        stock_losses = [stock(input_ids=i, labels=t).loss for i, t in BATCHES]
        stock_logits = stock(input_ids=ids).logits
        stock_tokens = stock.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)

    def train():
        losses = []
        for call in range(2 * CALLS):
            i, t = BATCHES[call % len(BATCHES)]
            loss = model(input_ids=i, labels=t).loss
            loss.backward()
            losses.append(loss.detach())
        return losses

    def logits():
        outs = []
        for call in range(2 * CALLS):
            with torch.no_grad():
                outs.append(model(input_ids=ids).logits if call % 20 else
                            model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
        return outs

    losses, outs = _in_threads([train, logits])
    wrong = [c for c, loss in enumerate(losses) if rel_err(loss, stock_losses[c % len(BATCHES)]) > 1e-5]
    assert not wrong, f"{len(wrong)} of {len(losses)} training losses differ from stock"
    for call, out in enumerate(outs):
        if call % 20:
            assert out.shape == stock_logits.shape and rel_err(out, stock_logits) <= 1e-5, call
        else:
            assert torch.equal(out, stock_tokens), call


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="real nn.DataParallel needs two CUDA devices")
def test_real_dataparallel_on_two_gpus():
    stock = tiny_llama().cuda()
    model = hf_fusedce.patch(copy.deepcopy(stock), backend="torch")
    stock_dp, model_dp = torch.nn.DataParallel(stock), torch.nn.DataParallel(model)
    ids = torch.cat([b[0] for b in BATCHES]).cuda()
    labels = torch.cat([b[1] for b in BATCHES]).cuda()
    for call in range(CALLS):
        for dp in (stock_dp, model_dp):
            dp.zero_grad(set_to_none=True)
        ref = stock_dp(input_ids=ids, labels=labels, use_cache=False).loss  # one loss per replica, gathered on device 0
        ours = model_dp(input_ids=ids, labels=labels, use_cache=False).loss
        assert ours.shape == ref.shape == (2,)
        ref.sum().backward()
        ours.sum().backward()
        assert rel_err(ours.detach(), ref.detach()) <= 1e-5, call
        for p, q in zip(model.parameters(), stock.parameters()):
            assert rel_err(p.grad, q.grad) <= 1e-5, call
