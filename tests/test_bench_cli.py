"""`macstream bench TARGET`: each target parses its own flags, generated from its config model (benchmarks/config.py),
and nothing else; every bench command the docs and the result files cite still parses. Parsing only: no model, no
benchmark is run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from benchmarks import config as bc
from macstream.cli import bench_settings, cmd_bench, main, parser

REPO = Path(__file__).resolve().parents[1]

# A setting other than the default for every field of every target, spelled as the flags (old spellings included)
SAMPLES = {
    "quality": ("--quality-entities 7 --rtqa-questions 9 --top-k 2 --checkpoint ck --out-dir od --threads 3",
                {"entities": 7, "rtqa_questions": 9, "top_k": 2, "checkpoint": "ck", "out_dir": "od", "threads": 3}),
    "ingest": ("--entities 5 --workers 1 2 4", {"entities": 5, "workers": [1, 2, 4]}),
    "backfill": ("--entities 5 --workers 3", {"entities": 5, "workers": [3]}),
    "serve": ("--serve-docs realtimeqa --entities 4 --requests 6 --clients 2 --top-k 4 --max-new-tokens 8 "
              "--batch-wait 0.02 --replica-threads 2",
              {"corpus": "realtimeqa", "entities": 4, "requests": 6, "clients": 2, "top_k": 4, "max_new_tokens": 8,
               "batch_wait": 0.02, "replica_threads": 2}),
    "baselines": ("--baseline-entities 3 --rtqa-docs 5 --tune-entities 2 --tuning t.json --quality-top-k 2 "
                  "--max-new-tokens 8",
                  {"entities": 3, "rtqa_docs": 5, "tune_entities": 2, "tuning": "t.json", "top_k": 2,
                   "max_new_tokens": 8}),
    "freshness": ("--freshness-docs 4 --freshness-rate 1.5 --freshness-burst 4 --poll-interval 0.1 --freshness-gate "
                  "none --freshness-variant batch_size=2,poll_timeout_ms=50 --variant workers=2 --freshness-workers 2 "
                  "--freshness-mode mac",
                  {"docs": 4, "rate": 1.5, "burst": 4, "poll_interval": 0.1, "gate": "none",
                   "variants": ["batch_size=2,poll_timeout_ms=50", "workers=2"], "workers": 2, "mode": "mac"}),
    "store": ("--points 1e3,2000 --store-engines edge --out s.json --local-cap 500 --store-queries 10 "
              "--quality-top-k 8 --store-workdir /tmp/w --append --codec int4",
              {"points": [1000, 2000], "engines": ["edge"], "out": "s.json", "local_cap": 500, "queries": 10,
               "top_k": 8, "workdir": "/tmp/w", "append": True, "codec": "int4"}),
    "soak": ("--docs 30 --rate 2.5 --qps 0.25 --prefill 100 --sample-s 2 --max-new-tokens 3 --workers 2",
             {"docs": 30, "rate": 2.5, "qps": 0.25, "prefill": 100, "sample_s": 2.0, "max_new_tokens": 3,
              "workers": 2}),
    "all": ("--checkpoint ck --out-dir od --threads 2", {"checkpoint": "ck", "out_dir": "od", "threads": 2}),
}


def settings(argv: list[str]):
    args = parser().parse_args(argv)
    assert args.fn is cmd_bench
    return bench_settings(args)


def refused(argv: list[str], capsys) -> str:
    """The command exits 2 (argparse, or the config's own check); its message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_every_target_has_a_config_and_every_field_a_flag_and_a_description() -> None:
    assert set(bc.TARGETS) == {"quality", "ingest", "backfill", "serve", "baselines", "freshness", "store", "soak",
                               "all"}
    assert set(bc.ALL) == set(bc.TARGETS) - {"store", "soak", "all"}
    assert set(SAMPLES) == set(bc.TARGETS)
    for target, model in bc.TARGETS.items():
        assert model.target == target
        sub = next(a for a in parser()._subparsers._group_actions[0].choices["bench"]._actions
                   if a.dest == "target").choices[target]
        option_strings = {s for a in sub._actions for s in a.option_strings}
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert set(bc.flag_names(name, field)) <= option_strings, (target, name)
        assert option_strings - set(bc.flags_of(model)) == {"-h", "--help", "--config"}  # nothing else


@pytest.mark.parametrize("target", list(bc.TARGETS))
def test_defaults_are_the_config_models(target) -> None:
    cfg = settings(["bench", target])
    assert type(cfg) is bc.TARGETS[target] and cfg == bc.TARGETS[target]()


@pytest.mark.parametrize("target", list(bc.TARGETS))
def test_every_flag_sets_its_field_and_the_config_reads_back_as_a_command(target) -> None:
    line, expected = SAMPLES[target]
    cfg = settings(["bench", target, *shlex.split(line)])
    assert cfg.model_dump() == bc.TARGETS[target]().model_dump() | expected
    own = set(bc.TARGETS[target].model_fields) - (set() if target in ("quality", "all") else
                                                  set(bc.BenchConfig.model_fields))  # shared: tried twice
    assert set(expected) == own - ({"source", "feeds_interval"} if target == "freshness" else set())  # feed: below
    # the command recorded for a programmatic run rebuilds the same config
    again = shlex.split(bc.command_line(cfg))
    assert again[:3] == ["macstream", "bench", target] and settings(again[1:]) == cfg


def test_today_defaults_are_kept() -> None:
    """The defaults of the single shared parser this replaces (results files were measured with them)."""
    assert settings(["bench", "quality"]).model_dump() == {"checkpoint": None, "out_dir": None, "threads": 1,
                                                          "entities": 60, "rtqa_questions": 150, "top_k": 4}
    assert settings(["bench", "ingest"]).workers == [1, 2] and settings(["bench", "backfill"]).entities == 40
    serve = settings(["bench", "serve"])
    assert (serve.entities, serve.requests, serve.clients, serve.top_k, serve.max_new_tokens, serve.corpus) == \
        (40, 40, 8, 8, 16, "synthetic")
    bl = settings(["bench", "baselines"])
    assert (bl.entities, bl.rtqa_docs, bl.tune_entities, bl.top_k, bl.max_new_tokens) == (16, 48, 5, 4, 16)
    fr = settings(["bench", "freshness"])
    assert (fr.docs, fr.burst, fr.poll_interval, fr.gate, fr.source, fr.feeds_interval) == \
        (60, 32, 0.05, "store", "produce", 5.0)
    st = settings(["bench", "store"])
    assert (st.points, st.engines, st.local_cap, st.queries, st.top_k) == ([10_000, 100_000], ["edge", "local"],
                                                                           10_000, 200, 4)


def test_feed_source_and_short_spellings() -> None:
    cfg = settings(["bench", "freshness", "--source", "feed", "--docs", "30", "--feeds-interval", "2"])
    assert (cfg.source, cfg.docs, cfg.feeds_interval) == ("feed", 30, 2.0)
    assert settings(["bench", "store", "--engines", "local,edge,local"]).engines == ["local", "edge"]
    assert settings(["bench", "freshness", "--mode", "select+rag@1"]).mode == "select+rag@1"


def test_a_flag_of_another_target_is_refused_naming_its_target(capsys) -> None:
    err = refused(["bench", "serve", "--freshness-docs", "3"], capsys)
    assert "--freshness-docs is not a setting of `bench serve`" in err and "`bench freshness`" in err
    err = refused(["bench", "quality", "--workers", "2"], capsys)
    assert "`bench ingest`" in err and "`bench backfill`" in err and "`bench freshness`" in err
    assert "--checkpoint" in refused(["bench", "store", "--checkpoint", "x"], capsys)
    assert "--points" in refused(["bench", "all", "--points", "10"], capsys)
    assert "unrecognized arguments: --nope" in refused(["bench", "quality", "--nope"], capsys)
    assert "TARGET" in refused(["bench"], capsys)  # a target is required
    assert "invalid choice" in refused(["bench", "everything"], capsys)


@pytest.mark.parametrize(("argv", "says"), [
    (["freshness", "--docs", "0"], "argument --docs/--freshness-docs: Input should be greater than or equal to 1"),
    (["freshness", "--freshness-docs", "x"], "argument --docs/--freshness-docs: Input should be a valid integer"),
    (["freshness", "--mode", "nope"], "unknown mode 'nope'"),
    (["freshness", "--variant", "topic=x"], "KEY one of batch_size"),
    (["freshness", "--poll-interval", "0"], "greater than 0"),
    (["freshness", "--gate", "maybe"], "invalid choice: 'maybe'"),
    (["ingest", "--workers", "1", "0"], "argument --workers: Input should be greater than or equal to 1"),
    (["store", "--points", "1e4,x"], "comma-separated window counts"),
    (["store", "--points", "0"], "greater than or equal to 1"),
    (["store", "--engines", "edge,cloud"], "'edge' or 'local'"),
    (["serve", "--batch-wait", "9"], "less than or equal to 5"),
    (["all", "--threads", "0"], "argument --threads"),
])
def test_a_bad_value_is_refused_naming_the_flag(argv, says, capsys) -> None:
    assert says in refused(["bench", *argv], capsys)


def test_settings_that_do_not_go_together_are_refused(capsys) -> None:
    err = refused(["bench", "freshness", "--source", "feed", "--freshness-variant", "batch_size=2"], capsys)
    assert "macstream: bench freshness: --variant: the produce source only" in err
    err = refused(["bench", "freshness", "--feeds-interval", "2"], capsys)
    assert "--feeds-interval: the feed source only" in err


def test_config_file_under_the_flags(tmp_path, capsys) -> None:
    path = tmp_path / "fresh.json"
    path.write_text(json.dumps({"docs": 9, "variants": ["batch_size=4"], "burst": 8}))
    cfg = settings(["bench", "freshness", "--config", str(path), "--docs", "5"])
    assert (cfg.docs, cfg.variants, cfg.burst) == (5, ["batch_size=4"], 8)
    path.write_text(json.dumps({"freshness_docs": 9}))
    err = refused(["bench", "freshness", "--config", str(path)], capsys)
    assert "bench freshness: freshness_docs: unknown key (allowed: " in err
    path.write_text(json.dumps({"docs": 0}))
    assert "bench freshness: docs (--docs): Input should be greater than or equal to 1" in \
        refused(["bench", "freshness", "--config", str(path)], capsys)


def cited_commands() -> list[tuple[str, str]]:
    """(where, command) for every `macstream bench ...` in README.md and docs/*.md (inline code, wrapped lines
    joined, and lines of code blocks) and every command a benchmark result file records."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        for block in re.findall(r"```.*?```", text, flags=re.S):
            found += [(page.name, m) for m in re.findall(r"^(macstream bench\b[^#\n]*)", block, flags=re.M)]
        spans = [" ".join(m.split()) for m in re.findall(r"`(macstream bench\b[^`]*)`", re.sub(r"```.*?```", "",
                                                                                              text, flags=re.S))]
        for span in spans:
            if " TARGET" in span:  # a placeholder: every target
                found += [(page.name, span.replace("TARGET", t)) for t in bc.TARGETS]
            elif " / " in span:  # "macstream bench quality / ingest / serve": each of them
                found += [(page.name, f"macstream bench {t.strip()}") for t in span[len("macstream bench"):]
                          .split("/")]
            elif span != "macstream bench":  # the command's name, not a command line
                found.append((page.name, span))
    for path in sorted((REPO / "benchmarks" / "results").glob("*/*.json")):
        how = json.loads(path.read_text()).get("how", {}) if path.stat().st_size < 5_000_000 else {}
        for command in [how.get("command"), *how.get("commands", [])] if isinstance(how, dict) else []:
            if isinstance(command, str) and command.startswith("macstream bench "):
                found.append((str(path.relative_to(REPO)), command))
    return found


def test_cited_commands_are_found() -> None:
    cited = {c for _, c in cited_commands()}
    assert "macstream bench all" in cited
    assert ("macstream bench quality --checkpoint checkpoints/mac-readout-smollm2-minilm --quality-entities 60 "
            "--rtqa-questions 100 --threads 2") in cited  # README, wrapped over two lines
    assert "macstream bench freshness --freshness-source feed --freshness-docs 30 --feeds-interval 5" in cited
    assert any(c.startswith("macstream bench store --points 10000,100000") for c in cited)
    assert len(cited) >= 15


@pytest.mark.parametrize(("where", "command"), cited_commands())
def test_every_cited_command_parses(where, command) -> None:
    words = shlex.split(command)
    assert words[:2] == ["macstream", "bench"], (where, command)
    cfg = settings(words[1:])
    assert cfg.target == words[2], (where, command)
