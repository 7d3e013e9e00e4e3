"""`hf-fusedce bench <job>`: each job lists only its own options; the one-command spelling of earlier releases
maps onto the same jobs; a new job is one registered function."""
from __future__ import annotations

import pytest

from hf_fusedce.cli.bench import registry
from hf_fusedce.cli.bench.legacy import is_older_spelling, translate
from hf_fusedce.cli.main import build_parser, main, subcommands


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_each_job_lists_only_its_own_options(capsys):
    jobs = subcommands(subcommands(build_parser())["bench"])
    assert {"op", "verify", "e2e", "profile", "report", "real-heads", "e2e-rss", "distill", "tp", "mlm"} <= set(jobs)
    assert _options(jobs["distill"]) >= {"--beta", "--temperature", "--teacher-dim"}
    assert not _options(jobs["op"]) & {"--beta", "--tp", "--e2e", "--verify", "--matrix", "--rounds"}
    assert not _options(jobs["distill"]) & {"--impls", "--tp", "--rounds", "--max-seconds"}
    assert len(_options(jobs["tp"])) <= 12
    text = _help(capsys, "bench", "distill")
    assert "--beta" in text and "--e2e" not in text and "--matrix" not in text
    listing = _help(capsys, "bench")
    assert all(f"    {name}" in listing for name in jobs) and "--shapes" not in listing


def test_older_spellings_map_onto_the_jobs():
    assert translate([]) == [["op"]]
    assert translate(["--device", "cpu", "--shapes", "64x4096", "--n", "128", "--repeats", "2"]) == \
        [["op", "--device", "cpu", "--shapes", "64x4096", "--n", "128", "--repeats", "2"]]
    assert translate(["--op", "distill", "--n", "64", "--beta", "0,0.5", "--impls", "x"]) == \
        [["distill", "--n", "64", "--beta", "0,0.5"]]  # --impls never applied to distillation
    assert translate(["--matrix", "real-heads", "--rounds", "1", "--e2e-rss", "4096", "--e2e-rss-steps=1"]) == \
        [["real-heads", "--rounds", "1"], ["e2e-rss", "4096", "--steps", "1"]]
    assert translate(["--skip-matrix", "--e2e", "--e2e-seq", "512", "--verify", "--verify-at", "a:1",
                      "--verify-at", "b:2", "--time-budget", "9", "--out", "o"]) == \
        [["verify", "--at", "a:1", "--at", "b:2", "--time-budget", "9", "--out", "o"],
         ["e2e", "--seq", "512", "--time-budget", "9", "--out", "o"]]
    assert translate(["--from-json", "r.json", "--out", "o"]) == [["report", "r.json", "--out", "o"]]
    assert translate(["--op", "tp", "--tp", "1,2"]) == [["tp", "--tp", "1,2"]]
    assert is_older_spelling(["--device", "cpu"]) and not is_older_spelling(["op", "--device", "cpu"])
    assert not is_older_spelling(["--help"]) and not is_older_spelling(["-h"])
    for bad in (["--e2e-seq"], ["--op", "nope"], ["--banana"]):
        with pytest.raises(registry.BadOption):
            translate(bad)


def test_both_spellings_parse_to_the_same_options():
    parser = build_parser()
    older = parser.parse_args(["bench", *translate(["--matrix", "real-heads", "--n", "64", "--gemm-floor"])[0]])
    current = parser.parse_args(["bench", "real-heads", "--n", "64", "--gemm-floor"])
    assert vars(older) == vars(current)


def test_a_new_job_is_one_registered_function(monkeypatch, capsys):
    monkeypatch.setattr(registry, "JOBS", dict(registry.JOBS))  # restored after the test

    def options(p):
        registry.common_options(p, "nowhere")
        p.add_argument("--sizes", default="1,2", help="comma list (default 1,2)")

    @registry.job("echo-sizes", "prints its sizes", options)
    def echo(args, session):
        print("sizes", registry.ints_of(args.sizes), session.command)
        return 0

    assert main(["bench", "echo-sizes", "--device", "cpu", "--sizes", "3,4"]) == 0
    assert "sizes [3, 4] ['hf-fusedce', 'bench', 'echo-sizes', '--device', 'cpu', '--sizes', '3,4']" in \
        capsys.readouterr().out
    assert main(["bench", "echo-sizes", "--device", "cpu", "--sizes", "x"]) == 2
    assert "hf-fusedce bench echo-sizes: invalid literal" in capsys.readouterr().err
