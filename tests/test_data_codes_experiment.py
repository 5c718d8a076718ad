"""The data-codes measurement (experiments/data_codes.py) runs end to end on digits and writes its files."""

import json
import os

from experiments import data_codes


def test_data_codes_writes_results_and_figure(tmp_path, capsys):
    out = str(tmp_path)
    data_codes.main(["--dataset", "digits", "--epochs", "1", "--lrs", "0.003",
                     "--codes", "raw-fp32,pixel-sr-2b,pca-sr-100,dct-sr-200", "--out", out])
    with open(os.path.join(out, "data_codes.json")) as f:
        results = json.load(f)
    rows = {r["code"]: r for r in results["rows"]}
    assert rows["pixel-sr-2b"]["bits_per_sample"] == 64 * 2
    # 100 bits of codes pad to 13 bytes a sample
    assert rows["pca-sr-100"]["bits_per_sample"] <= 104 and rows["pca-sr-100"]["setup_bits"] > 0
    for name in ("pixel-sr-2b", "pca-sr-100", "dct-sr-200"):
        r = rows[name]
        assert r["coded_bits_per_sample"] > 0 and r["model_bits"] > 0 and 0.0 <= r["test_accuracy"] <= 1.0
    assert os.path.getsize(os.path.join(out, "data_codes.png")) > 0
    assert "digits" in capsys.readouterr().out
