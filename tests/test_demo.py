"""The demo's one printed table: zero-shot CLIP first as the reference, every method's
in-domain and out-of-domain accuracy beside it and the difference to it."""
from sweeps import demo


def test_summary_puts_zero_shot_first_and_the_differences_beside(tmp_path):
    csv = tmp_path / f"{demo.SUMMARY_TABLE}.csv"
    csv.write_text(
        "table,row,role,column,mean,err,n\n"
        f"{demo.SUMMARY_TABLE},CLIPood,measured,CLIPWorld in-domain,32.6,0.5,2\n"
        f"{demo.SUMMARY_TABLE},CLIPood,measured,CLIPWorld out-of-domain,24.7,0.25,2\n"
        f"{demo.SUMMARY_TABLE},ZSCLIP,measured,CLIPWorld in-domain,28.1,0.0,2\n"
        f"{demo.SUMMARY_TABLE},ZSCLIP,measured,CLIPWorld out-of-domain,27.5,0.0,2\n"
        f"{demo.SUMMARY_TABLE},DISAM,published,CLIPWorld in-domain,90.0,0.0,1\n")
    text = demo.summary(csv, "tiny-vit", 2)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert "training-domain validation" in text and "2 trial(s)" in text
    assert [line.split("|")[1].strip() for line in lines[2:]] == \
        ["ZSCLIP (zero-shot reference)", "CLIPood"]  # published rows are not the demo's
    cells = [c.strip() for c in lines[3].split("|")[2:-1]]
    assert cells == ["32.6 ± 0.5", "24.7 ± 0.2", "+4.5", "-2.8"]
    assert [c.strip() for c in lines[2].split("|")[4:-1]] == ["—", "—"]


def test_the_demo_leaves_out_only_registered_methods_and_runs_the_rest():
    from algorithms.core import registry
    from sweeps import demo
    registered = set(registry.methods())
    assert set(demo.LEFT_OUT) <= registered, set(demo.LEFT_OUT) - registered
    assert set(demo.default_algorithms()) == registered - set(demo.LEFT_OUT)
    assert "ZSCLIP" in demo.default_algorithms()
