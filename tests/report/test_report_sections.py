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
