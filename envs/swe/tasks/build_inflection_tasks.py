"""How the vendored tasks were built (data provenance; not imported by mopd).

Source: the MIT-licensed `inflection` 0.5.1 sdist (`pip download --no-deps --no-binary :all:
inflection==0.5.1`, unpacked at SRC) and the upstream git history of jpvanhal/inflection. For each
task one real upstream fix is reverted in `inflection/__init__.py` (the bug as it shipped), the test
rows that fix added are removed from `test_inflection.py` (they become `test_patch`), the fix is the
gold `patch`, and FAIL_TO_PASS / PASS_TO_PASS come from actually running the tests before and after.
"""
import json, os, re, shutil, subprocess, sys, tempfile
SRC = "/tmp/sd/inflection-0.5.1"
OUT = "/work/main/envs/swe/tasks"
TASKS = [
 dict(instance_id="inflection__titleize-unicode", fix="e32443bb7dc1ba91a15336b5baab908d25f4b93a", issue="#33",
      src_revert=[('r"\\b(\'?\\w)",', 'r"\\b(\'?[a-z])",'), ("humanize(underscore(word)).title()", "humanize(underscore(word))")],
      test_rows=['    ("ana índia",             "Ana Índia"),\n', '    ("Ana Índia",             "Ana Índia"),\n'],
      problem="`inflection.titleize()` only capitalizes words whose first letter is an ASCII letter a-z. "
              "For example `titleize(\"ana índia\")` returns `'Ana índia'` instead of `'Ana Índia'`. "
              "Words starting with any letter (including non-ASCII ones such as 'í') must be capitalized, and "
              "the rest of each word lower-cased, like str.title()."),
 dict(instance_id="inflection__passersby", fix="1969b3a06a9ff06d023863e388cf8af01978d297", issue="(no issue)",
      src_revert=[('    (r"(?i)(passer)s?by$", r\'\\1sby\'),\n', ''), ('    (r"(?i)(passer)sby$", r\'\\1by\'),\n', '')],
      test_rows=['    ("passerby", "passersby"),\n'],
      problem="`inflection.pluralize(\"passerby\")` returns `'passerbys'`; the plural is `'passersby'`. "
              "`singularize(\"passersby\")` must give back `'passerby'`, and pluralizing `'passersby'` again must "
              "not change it."),
 dict(instance_id="inflection__potatoes", fix="03b137cfab11b7c0fdd2ea2fa33584344812c2d8", issue="#7",
      src_revert=[("(buffal|potat|tomat)o$", "(buffal|tomat)o$")],
      test_rows=['    ("potato", "potatoes"),\n'],
      problem="`inflection.pluralize(\"potato\")` returns `'potatos'` but should return `'potatoes'` "
              "(like 'tomato' -> 'tomatoes'); `singularize(\"potatoes\")` must return `'potato'`."),
]

def diff(a_dir, b_dir):
    out = subprocess.run(["git", "diff", "--no-index", "--no-prefix", "a", "b"], cwd=os.path.dirname(a_dir), capture_output=True, text=True).stdout
    # rewrite "a/x" "b/x" headers into -p1 form
    out = re.sub(r"^diff --git a/(\S+) b/(\S+)$", r"diff --git a/\1 b/\2", out, flags=re.M)
    out = re.sub(r"^--- a/", "--- a/", out, flags=re.M)
    return out

def run_tests(d):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_inflection.py"], cwd=d, capture_output=True, text=True)
    res = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(PASSED|FAILED|ERROR) (\S.*?)( - .*)?$", line)
        if m: res[m.group(2)] = m.group(1)
    return res

for t in TASKS:
    tdir = os.path.join(OUT, t["instance_id"]); shutil.rmtree(tdir, ignore_errors=True)
    repo = os.path.join(tdir, "repo"); os.makedirs(os.path.join(repo, "inflection"))
    shutil.copy(f"{SRC}/LICENSE", repo)
    src = open(f"{SRC}/inflection/__init__.py").read()
    for new, old in t["src_revert"]:
        assert new in src, new; src = src.replace(new, old, 1)
    open(f"{repo}/inflection/__init__.py", "w").write(src)
    tests = open(f"{SRC}/test_inflection.py").read()
    buggy_tests = tests
    for row in t["test_rows"]:
        assert row in buggy_tests, row; buggy_tests = buggy_tests.replace(row, "", 1)
    open(f"{repo}/test_inflection.py", "w").write(buggy_tests)
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        os.makedirs(a + "/inflection"); os.makedirs(b + "/inflection")
        open(a + "/inflection/__init__.py", "w").write(src); open(b + "/inflection/__init__.py", "w").write(open(f"{SRC}/inflection/__init__.py").read())
        gold = subprocess.run(["git", "diff", "--no-index", "a/inflection/__init__.py", "b/inflection/__init__.py"], cwd=tmp, capture_output=True, text=True).stdout
        open(a + "/test_inflection.py", "w").write(buggy_tests); open(b + "/test_inflection.py", "w").write(tests)
        test_patch = subprocess.run(["git", "diff", "--no-index", "a/test_inflection.py", "b/test_inflection.py"], cwd=tmp, capture_output=True, text=True).stdout
        # evaluate before/after
        before = os.path.join(tmp, "before"); shutil.copytree(repo, before); open(before + "/test_inflection.py", "w").write(tests)
        after = os.path.join(tmp, "after"); shutil.copytree(before, after); shutil.copy(f"{SRC}/inflection/__init__.py", after + "/inflection/__init__.py")
        rb, ra = run_tests(before), run_tests(after)
    gold = gold.replace(" a/a/", " a/").replace(" b/b/", " b/").replace("--- a/a/", "--- a/").replace("+++ b/b/", "+++ b/"); test_patch = test_patch.replace(" a/a/", " a/").replace(" b/b/", " b/").replace("--- a/a/", "--- a/").replace("+++ b/b/", "+++ b/")
    f2p = sorted(k for k, v in ra.items() if v == "PASSED" and rb.get(k) != "PASSED")
    p2p = sorted(k for k, v in ra.items() if v == "PASSED" and rb.get(k) == "PASSED")
    assert f2p and all(v == "PASSED" for v in ra.values()), (t["instance_id"], f2p)
    task = {"instance_id": t["instance_id"], "repo": "jpvanhal/inflection",
            "base_commit": f"inflection-0.5.1 (PyPI sdist) with upstream fix {t['fix'][:12]} reverted",
            "upstream_fix_commit": t["fix"], "upstream_issue": t["issue"],
            "problem_statement": t["problem"], "patch": gold, "test_patch": test_patch,
            "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "image": "python:3.11-slim", "snapshot": "repo",
            "test_files": ["test_inflection.py"], "license": "MIT"}
    json.dump(task, open(os.path.join(tdir, "task.json"), "w"), indent=1, ensure_ascii=False)
    print(t["instance_id"], "F2P", f2p, "P2P", len(p2p))
