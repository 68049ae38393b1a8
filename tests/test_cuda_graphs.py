"""The CUDA-graph decode step (engine/cuda_graphs.py) off a GPU: its static buffers, buckets and padding rows run
uncaptured here. Greedy generation equals the engine without it; padding rows touch only the scratch block;
Transformer.forward_decode, what a graph captures, makes no host sync and no value-dependent shape, through
the CPU kernels and through the Triton kernels (the GPU code path)."""
import collections
import contextlib

import pytest
import torch
from greedy_checks import assert_same_greedy
from tiny_models import tiny_models  # noqa: F401  (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from flashgen.engine.cuda_graphs import DecodeGraphs
from flashgen.engine.llm import LLM
from flashgen.kernels import use_backend

PROMPTS = ["hello world, the", "a b c", "the quick brown fox jumps over the lazy dog and then runs far away"]
# aten ops that read tensor values on the host, or whose output shape depends on them: a graph cannot hold them.
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "repeat_interleave"}


def _generate(llm, steps=72):  # past one 64-token block
    return llm.generate(PROMPTS, max_new_tokens=steps, temperature=0, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("arch,quant", [("llama", None), ("mistral", "int4"), ("gpt2", None), ("qwen3", "int8")])
def test_graph_decode_greedy_equals_the_engine(tiny_models, arch, quant, monkeypatch):  # noqa: F811
    sizes = collections.Counter()
    step = DecodeGraphs._step
    monkeypatch.setattr(DecodeGraphs, "_step", lambda self, size: sizes.update([size]) or step(self, size))
    # A float32 cache: the graph step is the Python layers, whose float32 sums differ from the C++ step's in the
    # last bits, and a 16-bit cache would round some of those differences up to a unit of its last place.
    kw = dict(quant=quant, max_seq_len=160, kv_cache_dtype="float32")
    want = _generate(LLM(tiny_models[arch], **kw))
    llm = LLM(tiny_models[arch], **kw, cuda_graphs=True, max_num_seqs=3)
    assert llm.engine.runner.graphs.buckets == [1, 2, 3]
    assert_same_greedy(want, _generate(llm))
    assert sizes[3] >= 70, sizes  # every decode step of the three ran through the static buffers


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[func._schema.name.split("::", 1)[1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_forward_decode_makes_no_host_sync(tiny_models, backend):  # noqa: F811
    llm = LLM(tiny_models["llama"], quant="int4", max_seq_len=160, cuda_graphs=True)
    graphs, b = llm.engine.runner.graphs, 3
    table = torch.arange(b * 2, dtype=torch.int32).reshape(b, 2)
    # model_ops sees the model's ops (flashgen's among them); kernel_ops, outside the Triton route, the ops of
    # the Triton launch wrappers too.
    model_ops, kernel_ops = _Ops(), _Ops()
    with kernel_ops, use_backend("triton") if backend == "triton" else contextlib.nullcontext(), model_ops:
        logits = graphs.run([5, 6, 7], [70, 3, 100], table)
    assert logits.shape == (b, llm.model.config.vocab_size) and torch.isfinite(logits).all()
    assert not SYNCING & (set(model_ops.names) | set(kernel_ops.names)), (model_ops.names, kernel_ops.names)
    assert model_ops.names["int4_linear"] and model_ops.names["flash_attn_kvcache"]
    if backend == "triton":
        assert kernel_ops.names["empty"] and not kernel_ops.names["int4_linear"]


def test_padding_rows_write_only_the_scratch_block(tiny_models):  # noqa: F811
    llm = LLM(tiny_models["llama"], max_seq_len=160, cuda_graphs=True, max_num_seqs=8)
    cache, graphs = llm.model.cache, llm.engine.runner.graphs
    scratch = cache.num_blocks - 1
    assert graphs.scratch == scratch == llm.engine.blocks.num_free  # the block manager never hands it out
    cache.k_heads.normal_(), cache.v_heads.normal_()
    k0, v0 = cache.k.clone(), cache.v.clone()
    table = torch.tensor([[3, 9], [4, 0], [7, 1]], dtype=torch.int32)
    seqlens = [70, 5, 64]  # rows: block 9 row 6, block 4 row 5, block 1 row 0
    graphs.run([11, 12, 13], seqlens, table)  # bucket 4: one padding row
    changed = ((cache.k != k0) | (cache.v != v0)).any(dim=(0, 3, 4))  # (blocks, rows)
    written = {(int(b), int(r)) for b, r in changed.nonzero()}
    assert written == {(9, 6), (4, 5), (1, 0), (scratch, 0)}
