"""reproduce.py --quick end to end on the tiny student (every arm, one seed), resume, results.json
against the printed table; the harness's pieces (bootstrap, arm dependencies, the untailored draw)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from arms import EVIDENCE_ARMS as ARMS
from conftest import run_script


def quick_argv(student, data_dir, workdir, *extra) -> list[str]:
    # --lr: the tiny fixture student is not the embedded one, so the driver asks for a rate. The sizes below
    # shrink --quick further (flags given win over its own), to keep CI's time: every stage still runs.
    return ["reproduce.py", "--quick", "--student", str(student), "--data_dir", str(data_dir), "--workdir", str(workdir),
            "--lr", "1e-3", "--cl_p", "0.1", "--eval_limit", "16", "--exam_limit", "16", "--annotate_limit", "48", "--max_steps", "6",
            *extra]


def stage_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("$ ")]


def test_quick_runs_every_arm_and_results_json_reproduces_the_table(tiny_student, data_dir, tmp_path):
    workdir = tmp_path / "evidence"
    dry = run_script(*quick_argv(tiny_student, data_dir, workdir), "--dry_run", timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert not workdir.exists()  # nothing written
    planned = {m.group(1): (m.group(2) == "at most ", int(m.group(3)))
               for m in re.finditer(r"seed \d+ (\S+)\s+(at most )?\s*(\d+) requests", dry.stdout)}
    assert set(planned) == {"round1/teacher", "tailored/round2/teacher", "tailored-no-reflect/round2/teacher",
                            "tailored-m1/round2/teacher", "untailored/round2/teacher"}
    result = run_script(*quick_argv(tiny_student, data_dir, workdir), timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    out = result.stdout
    stages = stage_lines(out)
    scripts = [line.split()[2] for line in stages]
    # round 0 once; then every arm trains and is evaluated twice; exams of the round-0 student, +reflect, std-cot
    # and +reflect-m1; feedback three times, the random annotation once
    assert scripts.count("run_trainer.py") == 9 and scripts.count("infer.py") == 2 + 9 * 2
    assert scripts.count("infer_student_wrong.py") == 4 and scripts.count("query_teacher.py") == 5
    teacher = [line for line in stages if "query_teacher.py" in line]
    # side by side (--jobs 2), round 1's annotation still comes first; the others in the order the arms get there
    assert [re.search(r"--mode (\w+)", t).group(1) for t in teacher][0] == "annotate"
    assert sorted(re.search(r"--mode (\w+)", t).group(1) for t in teacher) == ["annotate", "annotate"] + ["feedback"] * 3
    untailored, = [t for t in teacher if "--random_questions" in t]
    # the dry run's counts: round 1 exactly, each feedback stage within its bound, untailored as tailored
    asked = {stage: json.loads(next(workdir.glob(f"seed*/{stage}/summary.json")).read_text())["requests"]["total"]
             for stage in planned}
    assert asked["round1/teacher"] == planned["round1/teacher"][1] and not planned["round1/teacher"][0]
    assert all(0 < asked[stage] <= bound for stage, (_, bound) in planned.items())
    assert asked["untailored/round2/teacher"] == asked["tailored/round2/teacher"]
    saved = json.loads((workdir / "results.json").read_text())
    seed = saved["seeds"][0]
    arms = saved["arms"]
    tailored_requests = arms["tailored"]["per_seed"][str(seed)]["teacher"]["requests"] - \
        arms["+reflect"]["per_seed"][str(seed)]["teacher"]["requests"]
    assert f"--random_questions {tailored_requests} " in untailored + " "  # untailored: tailored's request count
    trains = {line.split("--output_dir ")[1].split()[0].split("/")[-3]: line for line in stages if "run_trainer.py" in line}
    assert "--contrastive no" in trains["std-cot"] and "--contrastive no" in trains["tailored-no-reflect"]
    assert "--cl_loss simpo" in trains["prefer"] and "--cl_neg_form own" in trains["prefer"]
    assert "--cl_loss triplet" in trains["reflect"] and "--contrastive yes" in trains["reflect"]
    assert "--cl_p 0.1 " in trains["reflect"] + " " and "--cl_p 1.0 " in trains["reflect-m1"] + " "
    assert "--cl_p 1.0 " in trains["tailored-m1"] + " " and "reflect-m1/round1/train/final" in trains["tailored-m1"]
    steps = arms["tailored"]["per_seed"][str(seed)]["train_steps"]
    assert f"--max_steps {steps} " in trains["more-epochs"] + " "
    assert "reflect/round1/train/final" in trains["more-epochs"] and "reflect/round1/train/final" in trains["tailored"]
    assert "std-cot/round1/train/final" in trains["tailored-no-reflect"]

    # the table: one row per arm, and every printed mean is the mean of results.json's per-seed numbers
    assert [row["arm"] for row in saved["rows"]] == list(ARMS)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm ") and " round " in line)
    printed = {line.split()[0]: line for line in lines[header + 1:header + 1 + len(ARMS)]}
    assert list(printed) == [row["arm"] for row in saved["rows"]]
    for row in saved["rows"]:
        for split in ("validation", "test"):
            per_seed = [r[split]["acc"] for r in arms[row["arm"]]["per_seed"].values()]
            assert row[split]["mean"] == pytest.approx(np.mean(per_seed))
            assert f"{row[split]['mean']:.4f} +- {row[split]['std']:.4f}" in printed[row["arm"]]
        assert row["round"] == ARMS[row["arm"]].round
    pairs = {(p["a"], p["b"]): p for p in saved["pairs"]}
    assert len(pairs) == 10 and all(p["low"] <= p["diff"] <= p["high"] and p["split"] == "test" for p in pairs.values())
    assert all(p["verdict"] == "not shown" for p in pairs.values())  # one seed: no claim
    one = pairs[("std-cot", "student")]
    assert one["diff"] == pytest.approx(arms["std-cot"]["per_seed"][str(seed)]["test"]["acc"]
                                        - arms["student"]["per_seed"][str(seed)]["test"]["acc"])
    assert f"{one['diff']:+.4f} [{one['low']:+.4f}, {one['high']:+.4f}]" in out
    assert len(saved["commands"]) == len(stages) and saved["versions"]["torch"]
    assert arms["student"]["per_seed"][str(seed)]["teacher"]["requests"] == 0
    assert (workdir / "evidence.png").stat().st_size > 1000

    again = run_script(*quick_argv(tiny_student, data_dir, workdir), timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not stage_lines(again.stdout)  # every stage skipped
    resaved = json.loads((workdir / "results.json").read_text())
    assert resaved["rows"] == saved["rows"] and resaved["pairs"] == saved["pairs"]
    assert resaved["commands"] == saved["commands"]  # read back from the stage logs

    other = run_script(*quick_argv(tiny_student, data_dir, workdir)[:-2], "--max_steps", "7", timeout=300)
    assert other.returncode == 2 and "--max_steps" in other.stderr and "other settings" in other.stderr


def test_paired_bootstrap_covers_a_known_difference():
    from paired_stats import paired_bootstrap

    rng = np.random.default_rng(1)
    ref = (rng.random((3, 2000)) < 0.5).astype(int)
    better = np.where(rng.random((3, 2000)) < 0.1, 1, ref)  # ~5% of answers flipped to right
    mean, low, high = paired_bootstrap(better, ref, 500)
    assert mean == pytest.approx((better - ref).mean()) and 0.03 < low < mean < high < 0.07
    assert paired_bootstrap(ref, ref, 100) == (0.0, 0.0, 0.0)
    # one seed: the interval is over questions alone
    mean, low, high = paired_bootstrap(better[:1], ref[:1], 300)
    assert low < mean < high


def test_arms_bring_the_arms_they_build_on():
    from evidence import with_dependencies

    assert with_dependencies(["more-epochs"]) == ["student", "+reflect", "tailored", "more-epochs"]
    assert with_dependencies(["tailored-no-reflect"]) == ["student", "std-cot", "tailored-no-reflect"]
    assert with_dependencies(list(ARMS)) == list(ARMS)


def test_untailored_draw_is_seeded_in_split_order_and_annotate_only(tmp_path):
    import args as args_mod
    import flags
    import tasks
    import teacher
    import wordmath
    from common import UserError

    data_dir = tmp_path / "data"
    (data_dir / "wordmath").mkdir(parents=True)
    (data_dir / "wordmath" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wordmath.generate(30, seed=4)))
    order = [ex.question for ex in tasks.load_split("wordmath", "train", str(data_dir))]

    def asked(seed: int, out: str) -> list[str]:
        summary = teacher.run_collection(flags.parse(args_mod.TeacherArguments, [
            "--task", "wordmath", "--data_dir", str(data_dir), "--backend", "offline", "--random_questions", "7",
            "--seed", str(seed), "--output_dir", str(tmp_path / out)]))
        assert summary["requests"]["total"] == 7 and summary["questions_asked"] <= 7
        return list(json.loads((tmp_path / out / "teacher_data.json").read_text()))

    first = asked(1, "a")
    assert first == sorted(first, key=order.index) and asked(1, "b") == first and asked(2, "c") != first

    # more requests than questions: some questions are asked twice (--max_wrong_per_question 2, feedback's
    # cap), each time as a fresh request with rationales of its own
    summary = teacher.run_collection(flags.parse(args_mod.TeacherArguments, [
        "--task", "wordmath", "--data_dir", str(data_dir), "--backend", "offline", "--random_questions", "45",
        "--num_samples", "1", "--offline_error_rate", "0", "--output_dir", str(tmp_path / "twice")]))
    data = json.loads((tmp_path / "twice" / "teacher_data.json").read_text())
    assert summary["requests"]["total"] == 45 and summary["questions_asked"] == len(data)
    assert sum(map(len, data.values())) == 45 and max(map(len, data.values())) == 2
    assert all(len(set(texts)) == len(texts) for texts in data.values())  # a repeat is not the journal's echo
    with pytest.raises(UserError, match="--random_questions 61: the split has only 30 questions .at most 2"):
        teacher.run_collection(flags.parse(args_mod.TeacherArguments, [
            "--task", "wordmath", "--data_dir", str(data_dir), "--backend", "offline", "--random_questions", "61",
            "--output_dir", str(tmp_path / "d")]))
    assert not (tmp_path / "d").exists()
    with pytest.raises(UserError, match="--random_questions .* needs --mode annotate"):
        flags.parse(args_mod.TeacherArguments, ["--mode", "feedback", "--student_wrong", "w.json",
                                                   "--random_questions", "3"])


def test_tune_chooses_rate_then_margin_on_validation_only(tiny_student, data_dir, tmp_path):
    workdir = tmp_path / "tune"
    argv = ["tune.py", "--student", str(tiny_student), "--data_dir", str(data_dir), "--workdir", str(workdir),
            "--seeds", "1", "--lrs", "1e-3,3e-3", "--margins", "0.1,1.0", "--eval_limit", "16", "--exam_limit", "16",
            "--annotate_limit", "48", "--max_steps", "4", "--num_return_sequences", "2", "--exam_max_new_tokens", "64"]
    result = run_script(*argv, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuning = json.loads((workdir / "tuning.json").read_text())
    by_lr, by_margin = tuning["std-cot"], tuning["+reflect"]
    best_lr = max(by_lr.values(), key=lambda r: r["mean"])["flags"]["learning_rate"]
    assert tuning["lr"] == best_lr and all(r["flags"]["learning_rate"] == best_lr for r in by_margin.values())
    assert {r["flags"]["cl_p"] for r in by_margin.values()} == {0.1, 1.0}
    assert tuning["cl_p"] == max(by_margin.values(), key=lambda r: r["mean"])["flags"]["cl_p"]
    assert f"chosen on validation: --lr {tuning['lr']:g} --cl_p {tuning['cl_p']:g}" in result.stdout
    # one exam and one annotation for every setting; validation only, test never read
    stages = stage_lines(result.stdout)
    assert sum("infer_student_wrong.py" in line for line in stages) == 1
    assert sum("query_teacher.py" in line for line in stages) == 1
    assert sum("run_trainer.py" in line for line in stages) == 4
    assert not [line for line in stages if "--test_on test" in line] and not list(workdir.rglob("eval_test"))
    trains = [line for line in stages if "run_trainer.py" in line]
    assert sum("--cl_p 1.0 " in line + " " and "--contrastive yes" in line for line in trains) == 1
