"""Following a PyTorchJob: create it or attach to one of the same name, print its conditions and pod phases.
"""

from __future__ import annotations

import sys
import time

from components.core.errors import UserError
from components.deploy.pytorchjob import GROUP, PLURAL, VERSION, Obj

JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"


def terminal_state(job: Obj) -> str | None:
    """"Succeeded"/"Failed" once the operator says so (a condition of that type with status True)."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Succeeded", "Failed") and str(cond.get("status")) == "True":
            return cond["type"]
    return None


def _last_condition(job: Obj, kind: str) -> Obj:
    conds = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == kind]
    return conds[-1] if conds else {}


class JobWatcher:
    """Polls a PyTorchJob and its pods; prints each new condition and pod phase once."""

    def __init__(self, custom, core, namespace: str, name: str, out=None):
        self.custom, self.core, self.namespace, self.name = custom, core, namespace, name
        self.out = out or sys.stdout
        self._seen_conditions: set[tuple] = set()
        self._pod_states: dict[str, str] = {}

    def _say(self, text: str) -> None:
        print(f"launch: {text}", file=self.out, flush=True)

    def job(self) -> Obj:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def pods(self) -> list:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={self.name}").items

    @staticmethod
    def pod_state(pod) -> str:
        state = pod.status.phase or "Unknown"
        for cs in pod.status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting and waiting.reason:
                state += f" ({waiting.reason})"
            if cs.restart_count:
                state += f" restarts={cs.restart_count}"
        return state

    def poll(self) -> str | None:
        job = self.job()
        for cond in (job.get("status") or {}).get("conditions") or []:
            key = (cond.get("type"), str(cond.get("status")), cond.get("reason"), cond.get("lastTransitionTime"))
            if key not in self._seen_conditions:
                self._seen_conditions.add(key)
                self._say(f"job {self.name}: {cond.get('type')}={cond.get('status')} "
                          f"{cond.get('reason', '')}: {cond.get('message', '')}".rstrip(": "))
        for pod in self.pods():
            state = self.pod_state(pod)
            if self._pod_states.get(pod.metadata.name) != state:
                self._pod_states[pod.metadata.name] = state
                self._say(f"pod {pod.metadata.name}: {state}")
        return terminal_state(job)

    def master_log_tail(self, lines: int = 40) -> str:
        for pod in self.pods():
            if (pod.metadata.labels or {}).get(REPLICA_TYPE_LABEL, "").lower() == "master":
                return self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, tail_lines=lines)
        return ""

    def wait(self, timeout: float, poll_s: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.poll()
            if state:
                return state
            if time.monotonic() > deadline:
                raise UserError(
                    f"PyTorchJob {self.namespace}/{self.name} still running after {timeout:.0f} s; it keeps "
                    f"running (kubectl -n {self.namespace} get pytorchjob {self.name}); wait again with the same "
                    "command, or delete it"
                )
            time.sleep(poll_s)


def _create_or_attach(custom, job: Obj, poll_s: float) -> str | None:
    """Create the job; if one of that name exists, attach to it while it runs, reuse it if it
    succeeded, replace it if it failed (its pods resume from the checkpoints on the volume)."""
    from kubernetes.client.exceptions import ApiException

    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
        print(f"launch: created PyTorchJob {ns}/{name}", flush=True)
        return None
    except ApiException as err:
        if err.status != 409:
            raise
    existing = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    state = terminal_state(existing)
    if state is None:
        print(f"launch: PyTorchJob {ns}/{name} is already running; following it", flush=True)
        return None
    if state == "Succeeded":
        print(f"launch: PyTorchJob {ns}/{name} already succeeded with this configuration; reusing it", flush=True)
        return state
    print(f"launch: PyTorchJob {ns}/{name} failed before; replacing it", flush=True)
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
    while True:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                break
            raise
        time.sleep(poll_s)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    print(f"launch: created PyTorchJob {ns}/{name}", flush=True)
    return None
