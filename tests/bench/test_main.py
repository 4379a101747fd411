"""python -m gunn.bench runs end to end and prints the ratios it promises."""

from __future__ import annotations

import re

import pytest

from gunn.bench.__main__ import main


@pytest.mark.slow
def test_benchmark_prints_memory_and_time_ratios_for_layer_and_model(capsys):
    assert main(["--models", "gunn15", "--batch", "2", "--memory-batch", "2", "--repeats", "1",
                 "--layer", "16,4,8", "--only", "layer", "models"]) == 0
    out = capsys.readouterr().out
    assert "## GunnLayer(16, 4) at 8x8" in out and "## gunn15 at 32x32" in out
    keys = ("memory gunn/sunn", "memory gunn-autograd/sunn", "time gunn/sunn", "time gunn/gunn-autograd",
            "time gunn/gunn-generic")
    for key in keys:
        values = re.findall(rf"{re.escape(key)}\s+(\d+\.\d+)", out)
        assert len(values) == 2, key  # once for the layer, once for the model
        assert all(float(v) > 0 for v in values)


def test_benchmark_rejects_a_bad_layer_description(capsys):
    with pytest.raises(SystemExit):
        main(["--layer", "16"])
    assert "--layer must be CHANNELS,SEGMENTS" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_compares_the_cpu_kernels_with_aten(capsys):
    from gunn.layers import cpu_kernels

    assert main(["--batch", "2", "--repeats", "1", "--only", "kernels"]) == 0
    out = capsys.readouterr().out
    if not cpu_kernels.available():
        assert "kernels not available" in out
        return
    speedups = re.findall(r"\(\s*(\d+\.\d)x\)", out)
    assert len(speedups) == 2 * 9  # fwd and bwd for three widths at three sizes
    assert all(float(v) > 0 for v in speedups)
    assert re.search(r"to channels_last: aten/kernel\s+\d+\.\dx\s+to NCHW: aten/kernel\s+\d+\.\dx", out)


def test_the_models_input_size_is_their_default_configuration():
    from gunn.bench.__main__ import input_size
    from gunn.models import default_cfg

    assert input_size("gunn18") == default_cfg("gunn18").input_size == (3, 224, 224)
    assert input_size("wide_gunn18")[1:] == (224, 224) and input_size("gunn15") == (3, 32, 32)


@pytest.mark.slow
def test_the_dispatch_section_counts_a_gpus_operations_per_training_step(capsys):
    from gunn.bench.__main__ import dispatch_counts

    counts = dispatch_counts(size=64)  # the counts do not depend on the image size
    out = capsys.readouterr().out
    assert "ops sunn18/resnext50_32x4d, fp32" in out and "ops gunn18 bf16/fp32" in out
    # The SUNN twin is as lean as a standard network of its kind (a ResNeXt block per layer).
    assert counts["sunn18", "fp32"] <= 1.5 * counts["resnext50_32x4d", "fp32"]
    # bfloat16 autocast costs a GUNN step no more operations than it costs its SUNN twin: nothing per unit.
    extra = {name: counts[name, "bf16"] - counts[name, "fp32"] for name in ("gunn18", "sunn18")}
    assert 0 <= extra["gunn18"] <= extra["sunn18"], extra


@pytest.mark.slow
def test_the_benchmark_writes_its_page_with_commit_date_and_command_keeping_the_text_around_it(tmp_path, capsys):
    from gunn.bench.__main__ import PAGE_BEGIN, PAGE_END

    page = tmp_path / "docs" / "benchmark.md"
    args = ["--batch", "2", "--memory-batch", "2", "--repeats", "1", "--layer", "16,4,8", "--only", "layer",
            "--out", str(page)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## GunnLayer(16, 4) at 8x8" in printed and f"written: {page}" in printed
    text = page.read_text()
    assert text.startswith("# Benchmark\n") and PAGE_BEGIN in text and PAGE_END in text
    header = re.search(r"^Measured at commit (\S+).* on (\d{4}-\d\d-\d\d) on (.+) \(load average (\S+) before, (\S+) "
                       r"after\); regenerate with: `(.+?)` \(it took \d+\.\d minutes\)", text, re.M)
    assert header, text[:500]
    assert header.group(6) == "python -m gunn.bench " + " ".join(args)
    assert "## GunnLayer(16, 4) at 8x8" in text.split("```text", 1)[1]
    # Hand-written text around the markers survives a second run; the measured part is replaced.
    page.write_text("# Benchmark\n\nWhat it measures.\n\n" + text[text.index(PAGE_BEGIN):] + "\nWhat it says.\n")
    assert main(args) == 0
    again = page.read_text()
    assert again.startswith("# Benchmark\n\nWhat it measures.\n\n" + PAGE_BEGIN) and again.endswith("\nWhat it says.\n")
    assert again.count(PAGE_BEGIN) == 1 and again.count("## GunnLayer(16, 4) at 8x8") == 1
