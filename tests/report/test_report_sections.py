"""Report sections rendered from manifest data."""


def test_bypass_section_shows_rounded_accuracy_columns_and_flags():
    """The bypass check renders one rounded column per problem kind, and names flagged models."""
    from subroutine_circuits.report.verdicts import section_bypass

    manifest = {"bypass_check": {
        "m_ok": {"accuracies": {"composite": 0.2933333333, "partition_a": 0.26}, "bypass": False,
                 "unit_kinds": ["head", "neuron"], "tolerance": 0.1},
        "m_leaky": {"accuracies": {"composite": 0.61, "partition_a": 0.9}, "bypass": True,
                    "unit_kinds": ["head"], "tolerance": 0.1},
    }}  # fmt: skip
    html = section_bypass(manifest)
    assert "accuracies: composite" in html and "accuracies: partition_a" in html
    assert "0.293" in html and "0.2933333333" not in html
    assert "head, neuron" in html and "{" not in html
    assert "Bypassing base models" in html and "m_leaky" in html
    assert "No base model bypasses" in section_bypass(
        {"bypass_check": {"m_ok": manifest["bypass_check"]["m_ok"]}}
    )


def test_vision_base_model_table_reads_current_and_older_meta(tmp_path):
    """Validation accuracy and the all-ablated accuracy come from this version's meta.json
    keys (``composite_val_acc``, ``bypass_check``) and from the older ones."""
    import json

    from subroutine_circuits.report.vision import base_model_table

    new = {
        "init": "trained",
        "composite_acc": 0.975,
        "composite_val_acc": 0.98,
        "bypass_check": {"accuracies": {"composite": 0.25}},
        "compute": {"train_steps": 250},
    }
    old = {"init": "pretrained", "composite_acc": 0.9, "val_composite_acc": 0.91,
           "bypass_acc": 0.26}  # fmt: skip
    for name, meta in (("a_new", new), ("b_old", old)):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "meta.json").write_text(json.dumps(meta))
    t = base_model_table(tmp_path).set_index("base model")
    assert t.loc["a_new", "val composite"] == 0.98
    assert t.loc["a_new", "bypass acc (all ablated)"] == 0.25
    assert t.loc["b_old", "val composite"] == 0.91
    assert t.loc["b_old", "bypass acc (all ablated)"] == 0.26
