"""Child names KubeRay takes for any attempt and trial, and resource quantities as Kubernetes writes them:
what the CRDs accept, what they refuse, and how the accepted ones reach the RayJob's pods."""

from __future__ import annotations

import copy
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import generated
from tests.kube.crdschema import admit
from tests.unit.test_pod_templates import (
    CRD,
    SETTINGS,
    SWEEP_CRD,
    kuberay_refuses,
    load,
    pods,
    render,
    stored,
)
from ttt_operator import builders, sweeps

# -- names ------------------------------------------------------------------------------------------

ATTEMPTS = [1, 2, 99, 100, 999, 1000, 10**6, 10**18]
TRIALS = [0, 1, 99, 9999, 10_000, 10**6]


def job_names() -> list[str]:
    """Valid TTTJob names of every length the CRD takes, some with dashes where a cut could fall."""
    names = []
    for n in range(1, builders.MAX_JOB_NAME + 1):
        names.append("j" + "x" * (n - 1))
        if n >= 2:
            names.append(("ab-" * n)[: n - 1] + "9")
    return names


def admitted_as_job_name(name: str) -> bool:
    job = load("tiny-cpu")
    job["metadata"]["name"] = name
    return not any(e.startswith("metadata.name") for e in admit(CRD, job)[1])


@pytest.mark.parametrize("attempt", ATTEMPTS)
def test_attempt_names_are_rayjob_names_kuberay_takes_for_any_name_and_attempt(attempt):
    seen = {}
    for name in job_names():
        assert admitted_as_job_name(name), name
        child = builders.attempt_name(name, attempt)
        assert kuberay_refuses(child) is None, (name, attempt, child)
        assert builders.attempt_name(name, attempt) == child  # stable
        plain = f"{name}-a{attempt}"
        if len(plain) <= 47:
            assert child == plain  # the common case reads as before
        else:
            # The job's name is still readable at its start, the attempt at its end.
            assert child.startswith(name[:8]) and child.endswith(f"-a{attempt}"), child
        assert child not in seen, (name, seen.get(child))
        seen[child] = name


def test_long_names_that_share_their_cut_do_not_collide():
    base = "a" * 30
    names = [f"{base}{tail}" for tail in ("-x", "-y", "x1", "x2", "-aa1", "-ab1")] + ["b" * 42, "b" * 41]
    for attempt in (1000, 10**6):
        children = [builders.attempt_name(n, attempt) for n in names]
        assert len(set(children)) == len(children), children
        assert all(kuberay_refuses(c) is None for c in children), children
    # An attempt number too long to keep (35 digits and more): the hash stands for it too.
    children = {builders.attempt_name(n, 10**40 + i) for n in names for i in range(3)}
    assert len(children) == 3 * len(names) and all(kuberay_refuses(c) is None for c in children)


@pytest.mark.parametrize("index", TRIALS)
def test_trial_names_are_tttjob_names_whose_attempts_kuberay_takes(index):
    seen = set()
    for length in range(1, 37):
        sweep = "s" + "w" * (length - 1)
        trial = sweeps.trial_name(sweep, index)
        assert sweeps.trial_name(sweep, index) == trial
        assert len(trial) <= builders.MAX_JOB_NAME and builders.NAME_RULE.match(trial), trial
        assert admitted_as_job_name(trial), trial
        if len(f"{sweep}-t{index}") <= builders.MAX_JOB_NAME:
            assert trial == f"{sweep}-t{index}"
        for attempt in ATTEMPTS:
            assert kuberay_refuses(builders.attempt_name(trial, attempt)) is None, (trial, attempt)
        assert trial not in seen
        seen.add(trial)


name_strategy = st.builds(
    lambda first, rest, last: (first + rest + last)[: builders.MAX_JOB_NAME],
    st.sampled_from(string.ascii_lowercase),
    st.text(alphabet=string.ascii_lowercase + string.digits + "-", max_size=45),
    st.sampled_from(string.ascii_lowercase + string.digits),
).filter(lambda n: builders.NAME_RULE.match(n) is not None)


@generated(300)
@given(name_strategy, st.integers(min_value=1), st.integers(min_value=0, max_value=10**9))
def test_generated_names_attempts_and_trials_always_make_valid_children(name, attempt, index):
    child = builders.attempt_name(name, attempt)
    assert kuberay_refuses(child) is None, (name, attempt, child)
    sweep = name[:36].rstrip("-")
    trial = sweeps.trial_name(sweep, index)
    assert len(trial) <= builders.MAX_JOB_NAME and builders.NAME_RULE.match(trial), trial
    assert kuberay_refuses(builders.attempt_name(trial, attempt)) is None


def test_a_late_attempt_of_a_long_trial_renders_a_rayjob_kuberay_takes():
    """The figures of the issue: a 36-character sweep's trial 9999 (a 42-character TTTJob) preempted
    into its thousandth attempt."""
    sweep = "s" * 36
    job = load("tiny-cpu")
    job["metadata"]["name"] = sweeps.trial_name(sweep, 9999)
    job = stored(job)
    rayjob = render(job, attempt=1000)
    name = rayjob["metadata"]["name"]
    assert kuberay_refuses(name) is None and name.endswith("-a1000"), name
    head, _ = pods(rayjob)
    assert {"name": "job-config", "configMap": {"name": name}} in head["volumes"]
    cm = builders.config_map(job, 1000, builders.render_config(job, SETTINGS))
    assert cm["metadata"]["name"] == name


# -- quantities -------------------------------------------------------------------------------------

MEMORY_OK = [
    "4Gi", "4096Mi", "1.5Gi", ".5Gi", "512Ki", "1Ti", "1Pi", "1Ei",
    "4G", "4000M", "4000000k", "1T", "1P", "1E", "1e9", "2.5e3", "1E9", "1073741824", 1073741824,
]  # fmt: skip
MEMORY_BAD = [
    "4ki", "4mi", "4gi", "4ti", "4KI", "4K", "4Gb", "4GiB", "4 Gi", "-4Gi", "+4Gi", "4m", "4Mi ",
    "", "Gi", "4Gii", "1e", "0x10", "4.5.1Gi",
]  # fmt: skip
CPU_OK = ["2", "0.5", ".5", "500m", "1500m", "1e1", 4]
CPU_BAD = ["two", "2 cores", "500mi", "500M", "2k", "1Gi", "-1", "+1", "", "m"]


def job_with(resources: dict | None = None, head: dict | None = None, extra: dict | None = None) -> dict:
    job = load("tiny-cpu")
    if resources is not None:
        job["spec"]["resources"] = resources
    if head is not None:
        job["spec"]["head"] = {"resources": head}
    if extra is not None:
        job["spec"]["worker"] = {"extraResources": extra}
    return job


def errors_of(job: dict) -> list[str]:
    errors = admit(CRD, job)[1]
    # A sweep's template is the same schema: it must agree.
    sweep = load("sweep-tiny-cpu")
    sweep["spec"]["template"].update(copy.deepcopy({k: v for k, v in job["spec"].items() if k != "recipe"}))
    sweep_errors = admit(SWEEP_CRD, sweep)[1]
    assert bool(errors) == bool(sweep_errors), (errors, sweep_errors)
    return errors


def container_memory(pod: dict) -> str:
    return pod["containers"][0]["resources"]["limits"]["memory"]


def shm_size(pod: dict) -> str:
    return next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")


@pytest.mark.parametrize("value", MEMORY_OK, ids=str)
def test_memory_quantities_kubernetes_takes_are_accepted_and_rendered(value):
    cases = [
        (job_with(resources={"cpu": "2", "memory": value}), lambda head, worker: container_memory(worker)),
        (job_with(resources={"cpu": "2", "memory": "4Gi", "sharedMemory": value}), lambda h, w: shm_size(w)),
        (job_with(head={"memory": value}), lambda head, worker: container_memory(head)),
        (job_with(head={"memory": "8Gi", "sharedMemory": value}), lambda head, worker: shm_size(head)),
    ]
    for job, rendered in cases:
        assert errors_of(job) == [], (value, job["spec"])
        head, worker = pods(render(stored(job)))  # render() checks the RayJob against KubeRay's CRD
        assert rendered(head, worker) == str(value), job["spec"]


@pytest.mark.parametrize("value", MEMORY_BAD, ids=repr)
def test_memory_quantities_kubernetes_refuses_or_that_make_no_sense_are_refused(value):
    cases = [
        (job_with(resources={"cpu": "2", "memory": value}), "spec.resources.memory"),
        (
            job_with(resources={"cpu": "2", "memory": "4Gi", "sharedMemory": value}),
            "spec.resources.sharedMemory",
        ),
        (job_with(head={"memory": value}), "spec.head.resources.memory"),
        (job_with(head={"memory": "8Gi", "sharedMemory": value}), "spec.head.resources.sharedMemory"),
    ]
    for job, field in cases:
        errors = errors_of(job)
        assert any(e.startswith(f"{field}:") for e in errors), (value, field, errors)


@pytest.mark.parametrize("value", CPU_OK, ids=str)
def test_cpu_quantities_are_accepted_and_rendered(value):
    for job, role in (
        (job_with(resources={"cpu": value, "memory": "4Gi"}), 1),
        (job_with(head={"cpu": value}), 0),
    ):
        assert errors_of(job) == [], (value, job["spec"])
        pod = pods(render(stored(job)))[role]
        assert pod["containers"][0]["resources"]["limits"]["cpu"] == str(value)


def test_cpu_quantities_give_the_workers_their_share_of_cores():
    for value, cores in (("1e1", 10.0), ("1500m", 1.5), (".5", 0.5), (4, 4.0)):
        assert builders.cpu_cores(value) == cores
    job = stored(job_with(resources={"cpu": "1e1", "memory": "4Gi"}))
    assert builders.render_config(job, SETTINGS).scale.cpus_per_worker == 10.0


@pytest.mark.parametrize("value", CPU_BAD, ids=repr)
def test_cpu_quantities_that_make_no_sense_are_refused(value):
    for job, field in (
        (job_with(resources={"cpu": value, "memory": "4Gi"}), "spec.resources.cpu"),
        (job_with(head={"cpu": value}), "spec.head.resources.cpu"),
    ):
        errors = errors_of(job)
        assert any(e.startswith(f"{field}:") for e in errors), (value, field, errors)


EXTRA_OK = [
    {"hugepages-2Mi": "5120Mi"},
    {"hugepages-1Gi": "2Gi", "vpc.amazonaws.com/efa": 4},
    {"vpc.amazonaws.com/efa": "32", "rdma/hca": 1},
    {"hugepages-2Mi": 1073741824},
    {"example.com/fpga": "0"},
]
EXTRA_BAD = [
    ({"hugepages-2Mi": "5120mi"}, "spec.worker.extraResources.hugepages-2Mi"),
    ({"hugepages-2Mi": "500m"}, "spec.worker.extraResources.hugepages-2Mi"),
    ({"hugepages-2mi": "1Gi"}, "spec.worker.extraResources"),
    ({"hugepages-": "1Gi"}, "spec.worker.extraResources"),
    ({"rdma/hca": "0.5"}, "spec.worker.extraResources"),
    ({"vpc.amazonaws.com/efa": "4Gi"}, "spec.worker.extraResources"),
    ({"vpc.amazonaws.com/efa": -1}, "spec.worker.extraResources"),
    ({"vpc.amazonaws.com/efa": "-1"}, "spec.worker.extraResources.vpc.amazonaws.com/efa"),
    ({"memory": "1Gi"}, "spec.worker.extraResources"),
    ({"nvidia.com/gpu": 8}, "spec.worker.extraResources"),
]


@pytest.mark.parametrize("extra", EXTRA_OK, ids=str)
def test_extra_resources_take_quantities_and_reach_the_workers_as_given(extra):
    job = job_with(extra=extra)
    assert errors_of(job) == [], extra
    head, worker = pods(render(stored(job)))
    limits = worker["containers"][0]["resources"]["limits"]
    assert {k: limits[k] for k in extra} == {k: str(v) for k, v in extra.items()}
    assert worker["containers"][0]["resources"]["requests"] == limits
    assert not set(extra) & set(head["containers"][0]["resources"]["limits"])


@pytest.mark.parametrize(("extra", "field"), EXTRA_BAD, ids=str)
def test_extra_resources_that_make_no_sense_are_refused(extra, field):
    errors = errors_of(job_with(extra=extra))
    assert any(e.startswith(f"{field}:") for e in errors), (extra, errors)
