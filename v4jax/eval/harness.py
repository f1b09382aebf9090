"""v4jax as an lm-evaluation-harness model backend (lm-eval 0.4.x), registered as `v4jax`.

Importing this module registers `V4JaxLM`; the package core never imports it (lm-eval is the
optional `eval` extra). lm-eval 0.4 discovers no plugins, so the `lm_eval` command only knows
models imported in its process: run it through this module, which takes exactly its flags
(`python -m v4jax.eval.harness --model v4jax --model_args pretrained=PATH,... --tasks ...`),
or import this module before `lm_eval.simple_evaluate(model="v4jax", ...)`.

model_args (`harness_args.py`): `pretrained` (release folder, v4jax Orbax checkpoint, or a
loaded `v4jax.Model`), `numerics` (reference | bf16), `dtype` (bfloat16 | float32), `mesh`
(`data:2xtensor:4`), `batch_size` (model_args win over lm-eval's `--batch_size`, default 1),
`max_length` (longest model input; default min(2048, max_position_embeddings)),
`max_gen_toks` (default 256), `buckets` (`64:256:1024`), `thinking` (chat prompts open the
reasoning block; `</think>` ends it in the output), `tokenizer` (a tokenizer.json), `seed`,
`prefix_cache` (`ram`, or a folder: `generate_until` prompts sharing few-shot examples skip
their cached 128-token blocks, `v4jax.PrefixCache`; its counters join `stats`).

Conventions (lm-eval's, on the official V4 encoding, `encoding_dsv4.py`):
- tokens: a text is BOS + its tokens unless it already starts with the BOS string (chat
  prompts do). A model whose vocabulary is smaller than the official tokenizer's (the tiny
  test models) reads UTF-8 bytes as ids (`v4jax.train.data.tokenizer_mode`, as in training).
- `loglikelihood`: the context's trailing spaces move to the continuation, whose tokens are
  those of context + continuation after the context's; an input longer than `max_length`
  loses tokens on the left. Scored by `v4jax.eval.Scorer`: sorted by length into fixed
  [batch_size, bucket] shapes, one compilation per bucket; `is_greedy` per request.
- `loglikelihood_rolling`: BOS + tokens in the disjoint windows of
  `v4jax.eval.perplexity.rolling_windows` (stride = max_length): every token predicted once.
- `generate_until`: `v4jax.generate` per batch of one generation setting, prompts
  left-truncated to max_length - max_gen_toks and padded to a bucket width
  (`harness_args.generation_batches`), cache of max_length; generation stops at EOS or
  `max_gen_toks`, then the text is cut at the first stop sequence (after `</think>` when
  thinking). Sampling uses `seed` for every batch.
- chat (`--apply_chat_template`, `--system_instruction`, `--fewshot_as_multiturn`):
  `v4jax.tokenizer.format_chat`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "v4jax.eval.harness needs lm-evaluation-harness: pip install 'v4jax[eval]' "
        "(or 'lm-eval>=0.4.9,<0.5')"
    ) from e
from tqdm import tqdm

import v4jax
from v4jax.decode import Sampling
from v4jax.eval import scoring
from v4jax.eval.harness_args import (
    batch_size_arg,
    generation_batches,
    load_model,
    parse_buckets,
    parse_model_args,
)
from v4jax.eval.perplexity import rolling_windows
from v4jax.eval.scoring import Request, Scorer
from v4jax.tokenizer import BOS, EOS, THINK_END, load_tokenizer
from v4jax.train.data import BYTE_OFFSET, TokenizerMode, make_tokenizer, tokenizer_mode

__all__ = ["V4JaxLM", "main"]

log = logging.getLogger(__name__)
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks"}


class V4JaxLM(TemplateLM):
    """lm-eval `LM` over a v4jax model (see the module docstring for the arguments)."""

    def __init__(
        self,
        pretrained=None,
        numerics: str | None = None,
        dtype: str | None = None,
        mesh=None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        buckets=None,
        thinking: bool = False,
        tokenizer: str | None = None,
        seed: int = 0,
        prefix_cache: str | None = None,
        device: str | None = None,  # lm-eval passes it; JAX_PLATFORMS picks the device
        max_batch_size: int | None = None,  # lm-eval passes it; batches are fixed here
    ):
        super().__init__()
        self.prefix_cache = None
        if prefix_cache not in (None, "", "none"):
            where = None if prefix_cache == "ram" else str(prefix_cache)
            self.prefix_cache = v4jax.PrefixCache(where)
        self.model = load_model(pretrained, numerics, dtype, mesh)
        cfg = self.model.config
        self._batch_size = batch_size_arg(batch_size)
        self._max_length = (
            min(2048, cfg.max_position_embeddings) if max_length is None else int(max_length)
        )
        self.scorer = Scorer(
            self.model,
            max_len=self._max_length,
            batch_size=self._batch_size,
            buckets=parse_buckets(buckets),
        )
        if int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks}: must be >= 1")
        self.max_gen_toks, self.thinking, self.seed = int(max_gen_toks), bool(thinking), int(seed)
        self.mode = tokenizer_mode(cfg.vocab_size)
        official = load_tokenizer(tokenizer) if tokenizer is not None else None
        self.tok = make_tokenizer(cfg.vocab_size, official)
        self.stats = collections.Counter()  # requests, compilations, seconds per request type
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's `key=value,...` model_args (a mesh spec may hold commas)."""
        return cls.create_from_arg_obj(parse_model_args(arg_string or ""), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over lm-eval's own settings (its `--batch_size` defaults to 1)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # ---- lm-eval's model surface ----
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # the official encoding starts every text with BOS

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return jax.devices()[0].platform

    @property
    def tokenizer_name(self) -> str:
        return "deepseek-v4" if self.mode is TokenizerMode.OFFICIAL else "utf8-bytes"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """A description of the chat format (lm-eval records it; the format is fixed)."""
        if not chat_template:
            return None
        return f"deepseek-v4 chat encoding (v4jax.chat), thinking={self.thinking}"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """lm-eval's messages -> the official V4 prompt string (BOS first). Without a
        generation prompt the last (assistant) message is left open: no EOS."""
        from v4jax.tokenizer import format_chat

        messages = [dict(m) for m in chat_history]
        if not add_generation_prompt and messages and messages[-1].get("role") == "assistant":
            messages[-1]["wo_eos"] = True
        return format_chat(
            messages, thinking=self.thinking, add_generation_prompt=add_generation_prompt
        )

    def get_model_info(self) -> dict:
        cfg, mesh = self.model.config, self.model.mesh
        return {
            "model_num_parameters": v4jax.count_params(cfg)["total"],
            "model_dtype": str(jnp.dtype(self.model.precision.dtype)),
            "numerics": str(self.model.precision.numerics.value),
            "mesh": None if mesh is None else dict(mesh.shape),
            "tokenizer": self.tokenizer_name,
        }

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Token ids; BOS first when `add_special_tokens` is True, or None and the text does
        not already start with the BOS string (left_truncate_len: keep the last ids)."""
        ids = self.tok.encode(string)
        if add_special_tokens or (add_special_tokens is None and not string.startswith(BOS)):
            ids = [self.tok.bos_id, *ids]
        cut = kw.get("left_truncate_len")
        return ids[-cut:] if cut else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text; BOS / EOS dropped unless `skip_special_tokens=False` (`</think>` and the
        chat markers are kept, as by the official tokenizer). Byte mode: an id past the byte
        range (a small model may emit any id of its vocabulary) reads as U+FFFD."""
        ids = [int(i) for i in ids]
        if self.mode is TokenizerMode.OFFICIAL:
            return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.tok.bos_id, self.tok.eos_id)]
        parts, run = [], []
        for i in ids:
            if i < 256 + BYTE_OFFSET:
                run.append(i)
            else:
                parts += [self.tok.decode(run), "\ufffd"]
                run = []
        return "".join([*parts, self.tok.decode(run)])

    # ---- the three request types ----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """[((context, continuation), context ids, continuation ids)] -> [(logprob, greedy)]."""
        with self._timed("loglikelihood", len(requests)):
            reqs = [self._request(c, t) for _, c, t in requests]
            scores = self._score(reqs, "loglikelihood", disable_tqdm)
        out = []
        for (key, _, _), s in zip(requests, scores, strict=True):
            answer = (s.logprob, s.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text (BOS + tokens), in disjoint windows."""
        with self._timed("loglikelihood_rolling", len(requests)):
            reqs, owner = [], []
            for k, (text,) in enumerate(r.args for r in requests):
                t = np.asarray(self.tok_encode(text), np.int32)
                for w, a, e in rolling_windows(len(t), self.max_length, self.max_length):
                    reqs.append(Request(t[w:a], t[a:e]))
                    owner.append(k)
            scores = self._score(reqs, "loglikelihood_rolling", disable_tqdm) if reqs else []
        parts = [[] for _ in requests]
        for k, s in zip(owner, scores, strict=True):
            parts[k].append(s.logprob)
        out = [math.fsum(p) for p in parts]
        for r, total in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations, batched per generation setting."""
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="v4jax generate_until", disable=disable_tqdm)
        with self._timed("generate_until", len(requests)):
            for rows in groups.values():
                contexts = [requests[i].args[0] for i in rows]
                texts = self._generate(contexts, requests[rows[0]].args[1], bar)
                for i, text in zip(rows, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.close()
        return out  # type: ignore[return-value]

    # ---- internals ----
    def _request(self, context, continuation) -> Request:
        """A scorer request, left-truncated to max_length input tokens as lm-eval does."""
        if not continuation:
            raise ValueError("loglikelihood: the continuation tokenizes to nothing")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"loglikelihood: a continuation of {len(continuation)} tokens does not fit in "
                f"max_length={self.max_length}"
            )
        seq = [*context, *continuation][-(self.max_length + 1) :]
        return Request(np.asarray(seq[: -len(continuation)]), np.asarray(continuation))

    def _score(self, reqs, what: str, disable_tqdm: bool):
        bar = tqdm(total=len(reqs), desc=f"v4jax {what}", disable=disable_tqdm)
        scores = self.scorer.loglikelihood(reqs, progress=lambda done, _: bar.update(done - bar.n))
        bar.close()
        return scores

    def _generate(self, contexts: list[str], gen_kwargs: dict, bar) -> list[str]:
        kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kw.get("until"), eos=EOS)
        steps, sampling = int(kw["max_gen_toks"]), self._sampling(kw)
        max_ctx = self.max_length - steps
        if max_ctx < 1:
            raise ValueError(
                f"max_gen_toks={steps} leaves no room for a prompt in max_length={self.max_length}"
            )
        prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
        buckets = sorted({b for b in self.scorer.buckets if b < max_ctx} | {max_ctx})
        lengths = [len(p) for p in prompts]
        out: list[str | None] = [None] * len(prompts)
        # one seed for every batch: `Sampling` is a static argument of the decode loop, so a
        # seed per batch would compile the loop once per batch
        sampling = Sampling(**sampling, seed=self.seed)
        for rows, width in generation_batches(lengths, buckets, self.batch_size):
            batch = [prompts[i] for i in rows]
            batch += [[self.tok.bos_id] * width] * (self.batch_size - len(batch))  # fillers
            gen = v4jax.generate(
                self.model,
                batch,
                max_new_tokens=steps,
                sampling=sampling,
                eos_id=self.tok.eos_id,
                max_len=self.max_length,
                prefix_cache=self.prefix_cache,
            )
            for j, i in enumerate(rows):
                ids = gen.tokens[j, : gen.lengths[j]].tolist()  # EOS (if any) is dropped
                think = THINK_END if self.thinking else None
                out[i] = postprocess_generated_text(self.tok_decode(ids), until, think)
            bar.update(len(rows))
        return out  # type: ignore[return-value]

    def _sampling(self, kw: Mapping) -> dict:
        """lm-eval's normalised generation kwargs -> `Sampling` fields (temperature 0: greedy)."""
        unknown = sorted(set(kw) - _SAMPLING_KEYS)
        if unknown and str(unknown) not in self._warned:
            self._warned.add(str(unknown))
            log.warning("v4jax: generation kwargs %s are not supported and are ignored", unknown)
        temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
        if temperature == 0.0:  # greedy: the filters do nothing (one compiled loop for all)
            return {"temperature": 0.0}
        return {
            "temperature": temperature,
            "top_p": float(kw.get("top_p") or 1.0),
            "top_k": int(kw.get("top_k") or 0),
        }

    @contextlib.contextmanager
    def _timed(self, what: str, n: int):
        """Adds the requests, seconds and XLA compilations of one call to `stats`."""
        scoring._listen()  # counts backend compilations (jax.monitoring events)
        t0, c0 = time.perf_counter(), scoring._counts["compiles"]
        try:
            yield
        finally:
            self.stats[f"{what}_requests"] += n
            self.stats[f"{what}_seconds"] += time.perf_counter() - t0
            self.stats["compilations"] += scoring._counts["compiles"] - c0
            if self.prefix_cache is not None:
                pcs = self.prefix_cache.stats()
                for k in ("hit_tokens", "prefill_tokens"):
                    self.stats[f"prefix_{k}"] = pcs[k]


def main() -> None:
    """`lm_eval` with the v4jax backend registered (same flags: `--model v4jax ...`)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # run as a script: register the importable module's class, not ours
    from v4jax.eval import harness

    harness.main()
else:
    register_model("v4jax")(V4JaxLM)
