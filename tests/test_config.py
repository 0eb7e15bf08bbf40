"""Option validation and per-layer resolution."""
from __future__ import annotations

import warnings

import pytest
import torch

import structattn
from structattn.config import Config


@pytest.mark.parametrize("options,key", [
    ({"method": "nope"}, "options['method']"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"compiler": "tvm"}, "options['compiler']"),
    ({"impl": "cuda"}, "options['impl']"),
    ({"min_seq_len": -1}, "options['min_seq_len']"),
    ({"min_seq_len": 1.5}, "options['min_seq_len']"),
    ({"causal": "yes"}, "options['causal']"),
    ({"layers": ["a"]}, "options['layers']"),
    ({"layers": {"a.*": "nope"}}, "options['layers']['a.*']"),
    ({"layers": {"a.*": {"method": "exact", "k": 3}}}, "unknown parameter 'k'"),
    ({"layers": {"a.*": 3}}, "options['layers']['a.*']"),
    ({"exact": {"x": 1}}, "unknown parameter 'x'"),
    ({"exact": 5}, "options['exact']"),
    ({"topk": {"k": 2 ** 70}}, "options['topk']['k'] = 1180591620717411303424 is outside the int64 range"),
    ({"layers": {"a.*": {"method": "topk", "k": -2 ** 64}}}, "options['layers']['a.*']['k']"),
    ({"min_seq_len": 2 ** 63}, "options['min_seq_len'] = 9223372036854775808"),
    (["method", "topk"], "options must be a dict of settings"),
    ("topk", "options must be a dict of settings"),
])
def test_bad_options_name_the_key(options, key):
    with pytest.raises(ValueError) as err:
        Config.from_options(options)
    assert key in str(err.value)
    if "method" in key or "layers" in key and "nope" in str(options):
        assert "allowed" in str(err.value)


def test_first_matching_glob_wins_and_params_merge():
    cfg = Config.from_options({
        "method": "exact",
        "layers": {"enc.layer.0.*": "doubled", "enc.layer.*": {"method": "exact"}, "enc.*": "doubled"},
    })
    assert cfg.resolve("enc.layer.0.attn").method == "doubled"
    assert cfg.resolve("enc.layer.1.attn").method == "exact"
    assert cfg.resolve("enc.pool").method == "doubled"
    assert cfg.resolve("dec.attn").method == "exact" and cfg.resolve("dec.attn").rule is None


def test_options_dict_is_not_mutated():
    options = {"method": "exact", "layers": {"a.*": {"method": "exact"}}}
    snapshot = repr(options)
    Config.from_options(options)
    assert repr(options) == snapshot


def test_unmatched_glob_warns_once():
    class M(torch.nn.Module):
        def forward(self, q):
            return torch.softmax(q @ q.transpose(-2, -1), -1) @ q

    q = torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = structattn.explain(M(), q, options={"method": "exact", "layers": {"decoder.*": "exact"}})
    msgs = [str(w.message) for w in caught if "matches no layer" in str(w.message)]
    assert len(msgs) == 1 and "'decoder.*'" in msgs[0]
    assert report.warnings == msgs


@pytest.mark.parametrize("options", [["method", "topk"], "topk", {"topk": {"k": 2 ** 70}}])
def test_bad_options_fail_clearly_through_compile_and_explain(options):
    """torch.compile hands a non-dict ``options`` to the backend as it is: the backend says what is
    wrong (through dynamo's BackendCompilerFailed), explain before compiling."""
    q = torch.randn(1, 2, 4, 8)

    def fn(q):
        return torch.softmax(q @ q.transpose(-2, -1), -1) @ q

    want = "int64" if isinstance(options, dict) else "options must be a dict"
    with pytest.raises(Exception, match=want):
        torch.compile(fn, backend="structattn", options=options)(q)
    with pytest.raises(ValueError, match=want):
        structattn.explain(fn, q, options=options)


def test_int64_bounds_are_accepted():
    cfg = Config.from_options({"method": "topk", "topk": {"k": 2 ** 63 - 1}, "min_seq_len": 2 ** 63 - 1})
    assert cfg.min_seq_len == 2 ** 63 - 1
