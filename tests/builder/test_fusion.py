"""Transformer fusion as candidates: attention fuses for a BERT built from a config; no attention, no candidate."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebuild.candidates import build_candidate
from edgebuild.cli import main
from edgebuild.export import export_onnx
from edgebuild.passes import fusion
from edgebuild.sources import load_model
from edgerun.bundle import open_bundle


def _source(spec):
    return load_model(spec, weights=None, input_shape=None, input_names=None, shapes_from_data=False)


def test_model_types_are_the_optimizers():
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    assert set(fusion.MODEL_TYPES) == set(MODEL_TYPES)


def test_tiny_bert_gets_attention_fused_and_a_validated_fused_candidate(tmp_path):
    result = CliRunner().invoke(
        main,
        ["pack", "tinymodels:tiny_bert", "--val-data", "tinymodels:token_data", "--variants", "all"]
        + ["-o", str(tmp_path), "--bench-seconds", "0.05"],
    )
    assert result.exit_code == 0, result.stderr
    manifest = open_bundle(result.stdout.strip().splitlines()[-1]).manifest
    rows = {r["name"]: r for r in manifest.benchmark["candidates"]}
    fused = rows["fused-fp32"]
    assert "Attention x2" in fused["recipe"] and "torchscript, eager attention" in fused["recipe"]
    assert fused["metric"] == "cosine" and fused["cosine_min"] > 0.999 and fused["within_budget"]
    assert "fused-int8-dynamic" in rows and "error" not in rows["fused-int8-dynamic"]
    # With --variants all every in-budget candidate ships, the fused ones too: their contrib ops (Attention,
    # SkipLayerNormalization) passed edgerun's golden check on the CPU provider before the bundle was written.
    in_budget = {name for name, row in rows.items() if row["within_budget"]}
    variants = {Path(m.path).stem for m in manifest.variants}
    assert variants < in_budget and len(variants) == len(in_budget) - 1 and "fused-fp32" in in_budget


def test_the_export_that_fuses_attention_is_recorded(tmp_path):
    source = _source("tinymodels:tiny_bert")
    exported = export_onnx(source, tmp_path, 18)
    config = fusion.fusion_config(fusion_options(), source, exported.path)
    assert config is not None and (config.model_type, config.num_heads, config.hidden_size) == ("bert", 4, 32)
    graph = fusion.FusionPlanner(source, exported, config, tmp_path, 18).fused()
    assert graph.fused["Attention"] == 2 and graph.export == "torchscript, eager attention"
    assert [a["export"] for a in graph.attempts][0].startswith("pack export")
    assert source.module.config._attn_implementation != "eager"  # the bundle's own model is not changed


def fusion_options(**kw):
    from edgebuild.options import PackOptions

    return PackOptions(**kw)


@pytest.mark.parametrize("spec", ["tinymodels:tiny_cnn", "tinymodels:token_classifier"])
def test_a_model_without_attention_gets_no_fusion_candidate(tmp_path, spec):
    from edgebuild.targets import load_target

    source = _source(spec)
    exported = export_onnx(source, tmp_path, 18)
    assert not fusion.has_attention(exported.path)
    assert fusion.fusion_plans(fusion_options(), load_target("x86"), source, exported, tmp_path) == []


def test_attention_without_a_hugging_face_config_is_found_in_the_graph(tmp_path):
    import torch

    class Block(torch.nn.Module):
        example_inputs = (torch.zeros(1, 5, 16),)

        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    path = tmp_path / "mha.onnx"
    torch.onnx.export(Block().eval(), (torch.zeros(1, 5, 16),), str(path), dynamo=False, opset_version=17)
    assert fusion.has_attention(path)


def test_a_failing_optimizer_fails_only_its_candidate(tmp_path, monkeypatch):
    import onnxruntime.transformers.optimizer as optimizer

    def broken(*args, **kwargs):
        raise RuntimeError("shape_inference failed for weight w")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    source = _source("tinymodels:tiny_bert")
    exported = export_onnx(source, tmp_path, 18)
    from edgebuild.targets import load_target

    plans = fusion.fusion_plans(fusion_options(), load_target("x86"), source, exported, tmp_path)
    assert [p.name for p in plans] == ["fused-fp32", "fused-int8-dynamic"]
    built = [build_candidate(plan, exported.path, tmp_path) for plan in plans]
    assert all(not c.usable and "shape_inference failed" in c.error for c in built)
    assert "torchscript" in built[0].error  # every export tried is named with its reason


def test_fused_partial_is_tried_when_fused_dynamic_int8_misses_the_budget(tmp_path):
    result = CliRunner().invoke(
        main,
        ["pack", "tinymodels:tiny_bert", "--val-data", "tinymodels:token_data", "--max-accuracy-drop", "0.000001"]
        + ["-o", str(tmp_path), "--bench-seconds", "0.05"],
    )
    assert result.exit_code == 0, result.stderr  # FP32 is always within budget
    rows = {r["name"]: r for r in open_bundle(result.stdout.strip().splitlines()[-1]).manifest.benchmark["candidates"]}
    assert not rows["fused-int8-dynamic"]["within_budget"]
    partial = rows["fused-int8-dynamic-partial"]
    # Either it met the budget with nodes in float (validated like the others) or it says why not.
    assert partial["within_budget"] or "budget not met" in partial.get("error", "")
    assert partial.get("drop", 0.0) <= 0.000001 or not partial["within_budget"]
