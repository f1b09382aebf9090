"""Gradient parity of the training objective with PyTorch autograd (oracle).

HF transformers' `DeepseekV4ForCausalLM` in float32 runs the same release folder as our
trainable form (`v4jax.train.trainable`, "bf16" numerics, float32): the same architecture
with no QAT simulation, so what is left is float32 summation order. HF has neither an MTP
block nor the V4 auxiliary losses; the oracle adds them in torch from HF's own modules and
tensors: the MTP block is an HF `DeepseekV4DecoderLayer` (window-only, scored routing) loaded
with `mtp.0.*` plus torch e_proj / h_proj / norms / hc-head, fed with HF's final streams
(captured before its `hc_head`); the balance term is the paper's formula (V3 §2.1.2) on the HF
routers' logits and picks; the indexer KL (V3.2 §2.1.1) uses HF's attention probabilities, index
scores and selected-entry mask. Each term is differentiated on its own by torch and by
jax (one vjp per term) and compared by release tensor name.

Tolerances: loss values to 1e-6 relative (float32 reductions of O(1) terms over ~10^2
tokens); gradients to 1e-4 relative Frobenius norm (what the logits parity allows: float32
summation order through ~10 sequential float32 matmuls / Sinkhorn steps, each ~1e-6).
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from v4jax.checkpoint.safetensors import ShardedCheckpoint
from v4jax.checkpoint.synthetic import (
    dequantize_fp4,
    dequantize_fp8_blocks,
    write_release_checkpoint,
)
from v4jax.numerics.policy import jit as numerics_jit
from v4jax.train import losses
from v4jax.train.model import release_named, trainable

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests.oracles import hf  # noqa: E402

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

# window, CSA, HCA, CSA + MTP; two hash layers. 130 tokens: 32 CSA entries > index_topk 8 (the
# indexer selects), one complete HCA entry, the 16-token window wraps. 16 indexer heads: no
# exact top-k ties at 0 (see test_hf_parity).
CFG = v4jax.config.tiny(index_heads=16)
LENGTH = 130
TERMS = ("lm", "mtp", "balance", "indexer_kl")
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = write_release_checkpoint(CFG, tmp_path_factory.mktemp("train_grad"), seed=7)
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, CFG.vocab_size, (2, LENGTH))
    tokens[:, 0] = 0
    mask = np.ones(tokens.shape, np.float32)
    mask[0, :20] = 0  # a prompt that is not a target
    mask[1, 100:] = 0  # padding
    model = v4jax.load(folder, numerics="bf16", dtype=jnp.float32, progress=False)
    values, grads = _ours(trainable(model), jnp.asarray(tokens), jnp.asarray(mask))
    ours = {
        t: (float(values[i]), release_named(jax.tree.map(lambda g, i=i: g[i], grads)))
        for i, t in enumerate(TERMS)
    }
    return ours, _theirs(folder, tokens, mask)


@numerics_jit
def _ours(tm, tokens, mask):
    """The four unweighted terms and each one's gradient (a vjp per term, vmapped)."""

    def terms(params):
        _, met = losses.loss(
            tm.replace(params=params),
            tokens,
            mask,
            mtp_weight=1.0,
            balance_weight=1.0,
            indexer_weight=1.0,
            indexer_stage="sparse",
        )
        return jnp.stack([met[t] for t in TERMS])

    values, vjp = jax.vjp(terms, tm.params)
    return values, jax.vmap(lambda ct: vjp(ct)[0])(jnp.eye(len(TERMS), dtype=jnp.float32))


@pytest.mark.parametrize("term", TERMS)
def test_loss_term_matches_torch(both, term):
    ours, theirs = both
    assert abs(ours[term][0] - theirs[term][0]) <= LOSS_RTOL * abs(theirs[term][0])


# LM-loss gradients HF does not have, and why: the indexer picks entries by a discrete top-k
# (no gradient reaches it through the attention), and HF has no MTP block (the LM loss does not
# use it either).
NO_LM_GRAD = (r"\.attn\.indexer\.", r"^mtp\.0\.")


def test_lm_gradients_match_torch(both):
    ours, theirs = both
    names, errors = _compare(ours["lm"][1], theirs["lm"][1])
    without = {n for n in ours["lm"][1] if theirs["lm"][1].get(n) is None}
    assert without == {n for n in ours["lm"][1] if any(re.search(p, n) for p in NO_LM_GRAD)}
    assert errors == {}, errors
    assert len(names) > 100


@pytest.mark.parametrize("term", ("mtp", "balance"))
def test_aux_gradients_match_torch(both, term):
    ours, theirs = both
    names, errors = _compare(ours[term][1], theirs[term][1])
    assert errors == {}, errors
    assert any(n.startswith("mtp.0.") for n in names)  # the MTP block's own weights
    assert "layers.1.attn.wq_a.weight" in names  # and the main stack, through the streams


def test_indexer_kl_gradients_match_torch(both):
    """Sparse stage: the KL reaches only the indexers (inputs and target detached); HF's do
    not detach, so only the indexers' gradients are compared."""
    ours, theirs = both
    idx = {n: g for n, g in ours["indexer_kl"][1].items() if ".indexer." in n}
    names, errors = _compare(idx, theirs["indexer_kl"][1])
    assert errors == {}, errors
    assert len(names) == 2 * 6  # two CSA layers: wq_b, weights_proj, compressor (4)
    rest = [n for n, g in ours["indexer_kl"][1].items() if n not in idx and np.any(g)]
    assert rest == []


def _compare(ours: dict, theirs: dict):
    """Relative Frobenius errors above GRAD_RTOL; where torch has no gradient ours must be 0."""
    compared, errors = [], {}
    for name, g in ours.items():
        g, h = np.asarray(g), theirs.get(name)
        if h is None:
            if np.any(g):
                errors[name] = "torch has no gradient, ours is non-zero"
            continue
        compared.append(name)
        err = np.linalg.norm(g - h) / max(np.linalg.norm(h), 1e-30)
        if not err <= GRAD_RTOL:
            errors[name] = float(err)
    return compared, errors


# --------------------------------------------------------------------------- the torch side


def _theirs(folder, tokens, mask) -> dict:
    """Each term's value and its torch gradients by release name (None: no gradient)."""
    model = copy.deepcopy(hf.hf_model(folder))
    mtp = _TorchMTP(model, folder)
    seen = _hooks(model, mtp)
    ids = torch.from_numpy(tokens.astype(np.int64))
    m = torch.from_numpy(mask)
    logits = model(input_ids=ids, use_cache=False).logits
    values = {"lm": _ce(logits[:, :-1], ids[:, 1:], m[:, 1:])}
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # last slot: a dummy (causal, unused)
    m_logits = mtp(seen["streams"], nxt, seen["ctx"])
    values["mtp"] = _ce(m_logits[:, : LENGTH - 2], ids[:, 2:], m[:, 1:-1] * m[:, 2:])
    routers = [g for g in seen["routers"]] + [(*seen["mtp_router"], LENGTH - 1)]
    values["balance"] = sum(_balance(*r) for r in routers)
    values["indexer_kl"] = _kl(seen)
    params = dict(model.named_parameters()) | {f"mtp:{n}": p for n, p in mtp.named_parameters()}
    out = {}
    for term, v in values.items():
        gs = torch.autograd.grad(v, list(params.values()), retain_graph=True, allow_unused=True)
        by = dict(zip(params, gs, strict=True))
        out[term] = (float(v), {n: _grad_of(n, by, model, mtp) for n in _release_names(folder)})
    return out


def _hooks(model, mtp) -> dict:
    seen: dict = {"routers": [], "kl": []}
    model.model.hc_head.register_forward_hook(lambda m, a, o: seen.__setitem__("streams", a[0]))

    def ctx(mod, args, kwargs):
        seen["ctx"] = {k: kwargs[k] for k in ("position_embeddings", "position_ids")}
        seen["ctx"]["attention_mask"] = kwargs["attention_mask"]

    model.model.layers[0].register_forward_pre_hook(ctx, with_kwargs=True)
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        if not layer.mlp.is_hash:
            gate.register_forward_hook(
                lambda m, a, o, g=gate: seen["routers"].append((o[0], o[2], g, LENGTH))
            )
        if model.config.layer_types[i] == "compressed_sparse_attention":
            rec: dict = {}
            comp = layer.self_attn.compressor
            layer.self_attn.register_forward_hook(lambda m, a, o, r=rec: r.update(probs=o[1]))
            comp.register_forward_hook(lambda m, a, o, r=rec: r.update(bias=o[1]))
            comp.indexer.scorer.register_forward_hook(lambda m, a, o, r=rec: r.update(scores=o))
            seen["kl"].append(rec)
    g = mtp.layer.mlp.gate
    g.register_forward_hook(lambda m, a, o: seen.__setitem__("mtp_router", (o[0], o[2], g)))
    return seen


def _ce(logits, targets, weight):
    lp = torch.log_softmax(logits.float(), dim=-1)
    nll = -lp.gather(-1, targets[..., None])[..., 0]
    return (nll * weight).sum() / weight.sum()


def _balance(logits, top, gate, length):
    """alpha-free sequence-wise balance term (V3 report §2.1.2) of one router."""
    e, k = gate.num_experts, gate.top_k
    s = gate.score_fn(logits).view(2, -1, e)[:, :length]
    hits = torch.nn.functional.one_hot(top.view(2, -1, k)[:, :length], e).sum(-2).float()
    f = hits.sum(1) * (e / (k * length))
    p = (s / s.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def _kl(seen) -> torch.Tensor:
    """KL(p || softmax(index scores)) over each query's selected entries, mean over queries
    and CSA layers; p = attention probabilities of the entries summed over heads."""
    total, count = 0.0, 0
    for rec in seen["kl"]:
        t = rec["scores"].shape[-1]
        mass = rec["probs"][..., -t:].sum(1).detach()  # [B, S, T]
        valid = rec["bias"][:, 0] == 0
        has = valid.any(-1)
        p = torch.where(valid, mass, 0.0)
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        scores = rec["scores"].masked_fill(~valid, float("-inf")).masked_fill(~has[..., None], 0)
        logq = torch.log_softmax(scores, -1)
        terms = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), 0.0).sum(-1)
        total = total + terms[has].sum()
        count += int(has.sum())
    return total / count


class _TorchMTP(torch.nn.Module):
    """The MTP block `mtp.0` (reference `MTPBlock`) from HF modules, float32."""

    def __init__(self, model, folder):
        super().__init__()
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m4

        cfg, d = copy.deepcopy(model.config), model.config.hidden_size
        self.n = cfg.num_hidden_layers
        cfg.layer_types = [*cfg.layer_types, "sliding_attention"]
        cfg.mlp_layer_types = [*cfg.mlp_layer_types, "moe"]
        self.layer = m4.DeepseekV4DecoderLayer(cfg, self.n).float()
        self.e_proj, self.h_proj = (torch.nn.Linear(d, d, bias=False) for _ in range(2))
        self.enorm, self.hnorm, self.norm = (
            m4.DeepseekV4RMSNorm(d, eps=cfg.rms_norm_eps) for _ in range(3)
        )
        self.hc_head = m4.DeepseekV4HyperHead(cfg)
        self.model = [model]  # not a submodule: its parameters stay the main model's
        with torch.no_grad():
            for name, value in _release_tensors(folder, "mtp.0."):
                t = self.tensor(name)
                t.copy_(torch.from_numpy(value).to(t.dtype))

    def forward(self, streams, next_ids, ctx):
        model = self.model[0]
        e = self.e_proj(self.enorm(model.model.embed_tokens(next_ids)))
        x = e[:, :, None, :] + self.h_proj(self.hnorm(streams))
        x = self.layer(x, input_ids=next_ids, **ctx)
        return model.lm_head(self.norm(self.hc_head(x)))

    def tensor(self, name: str) -> torch.Tensor:
        """The torch tensor (or expert slice) of release tensor mtp.0.<rest>."""
        rest = name.removeprefix("mtp.0.")
        head = rest.split(".")[0]
        if head in ("e_proj", "h_proj", "enorm", "hnorm", "norm"):
            return getattr(self, head).weight
        if rest.startswith("hc_head_"):
            return getattr(self.hc_head, "hc_" + rest.removeprefix("hc_head_"))
        return _hf_slice(self.layer, f"model.layers.{self.n}.", f"layers.{self.n}.{rest}")


def _hf_slice(module, prefix: str, release_name: str) -> torch.Tensor:
    """`hf.hf_tensor` for a module whose names drop `prefix`."""
    name = hf.hf_name(release_name).removeprefix(prefix)
    try:
        t = module.get_parameter(name)
    except AttributeError:
        t = module.get_buffer(name)
    if e := re.search(r"\.experts\.(\d+)\.(w[123])\.", release_name):
        i, w = int(e.group(1)), e.group(2)
        inter = CFG.moe_inter_dim
        t = t[i] if w == "w2" else t[i, :inter] if w == "w1" else t[i, inter:]
    return t


def _release_tensors(folder, prefix: str):
    """(name, float32 / int64 array) of the folder's trained tensors under `prefix`."""
    ck = ShardedCheckpoint(folder)
    try:
        for name in sorted(ck.keys()):
            if not name.startswith(prefix) or name.endswith(".scale"):
                continue
            x, dt = ck.get(name), ck.info(name).dtype
            if dt == "F8_E4M3":
                x = dequantize_fp8_blocks(x, ck.get(name.removesuffix("weight") + "scale"))
            elif dt == "I8":
                x = dequantize_fp4(x, ck.get(name.removesuffix("weight") + "scale"))
            yield name, np.asarray(x).astype(np.int64 if dt == "I64" else np.float32)
    finally:
        ck.close()


def _release_names(folder) -> list[str]:
    return [n for n, _ in _release_tensors(folder, "")]


def _grad_of(name: str, grads: dict, model, mtp) -> np.ndarray | None:
    """torch's gradient of release tensor `name` (expert slices cut), None if it has none."""
    if name.endswith(("gate.bias", "tid2eid")):
        return None
    if name.startswith("mtp.0."):
        t, prefix, mod = mtp.tensor(name), "mtp:", mtp
    else:
        t, prefix, mod = hf.hf_tensor(model, name), "", model
    for pname, p in mod.named_parameters():
        if p.data_ptr() == t.data_ptr() or _is_slice_of(t, p):
            g = grads[prefix + pname]
            if g is None:
                return None
            return _same_slice(g, p, t).detach().numpy()
    raise KeyError(name)


def _is_slice_of(t, p) -> bool:
    return t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()


def _same_slice(g, p, t):
    """g (gradient of p) cut like the view t of p."""
    return g.as_strided(t.shape, t.stride(), t.storage_offset() - p.storage_offset())
