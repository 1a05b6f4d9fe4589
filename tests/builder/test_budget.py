from edgebuild.budget import drop_in_samples, resolution_note


def test_a_budget_finer_than_one_sample_is_explained_with_what_would_resolve_it():
    note = resolution_note("accuracy", 40, 0.01)
    assert note is not None
    assert "on 40 samples accuracy moves in steps of 0.0250 (one sample = 2.5 points)" in note
    assert "at least 100 validation samples" in note and "a budget of at least 0.0250 (2.5%)" in note
    assert resolution_note("accuracy", 40, 0.05) is None  # two samples may change
    assert resolution_note("cosine", 40, 0.001) is None  # a continuous metric has no sample step
    assert resolution_note("agreement", 1000, 0.01) is None


def test_a_counting_drop_is_also_said_in_samples():
    assert drop_in_samples("accuracy", 0.075, 40) == " = 3 of 40 samples"
    assert drop_in_samples("cosine", 0.075, 40) == ""
