"""The Label Studio client: the only module that imports ``label_studio_sdk``.

:class:`Studio` wraps the SDK with what the bridge needs (an idempotent project, bulk task import,
predictions with score and cluster, annotations, webhooks, users) and one fault model: every SDK or
network failure becomes a :mod:`fleet.errors` exception, :class:`~fleet.errors.RetryableError` for
Label Studio being down, slow or busy and :class:`~fleet.errors.PermanentError` for refusals.
Idempotent calls are retried here with backoff; calls that create something (task import, annotation
create) are not, because a lost response does not say whether they happened: their callers check
what exists before trying again, so nothing is duplicated.

The HTTP client is passed in (``http=``), so tests can put a fault-injecting transport between the
bridge and a real Label Studio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

import httpx

from fleet.errors import (
    FlywheelError,
    InvalidInput,
    NotFound,
    ProtocolError,
    TransportError,
    error_for_status,
    parse_retry_after,
    response_detail,
)
from fleet.retry import RetryPolicy, retrying
from labeling.configs import config_classes
from labeling.projects import Project, ProjectSettings, ProjectUpdateRefused, project_from
from labeling.records import AnnotationRecord, TaskRecord, parse_annotation, parse_task

try:
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError
except ImportError as exc:  # pragma: no cover - exercised by the boundary tests
    from fleet.errors import MissingExtra

    raise MissingExtra("'label_studio_sdk' is not installed; install it with: "
                       "pip install 'edge-flywheel[labeling]'") from exc

log = logging.getLogger(__name__)
T = TypeVar("T")

class Studio:
    """One Label Studio server, as one user (the token's owner)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        http: httpx.Client | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        workers: int = 4,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"Label Studio URL must start with http:// or https://; received {url!r}")
        if not token:
            raise InvalidInput("a Label Studio API token is required (legacy token or personal access token)")
        self.url = url.rstrip("/")
        self._own_http = http is None
        self.http = http or httpx.Client(timeout=timeout_s)
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.workers = max(1, workers)
        self.sdk = LabelStudio(base_url=self.url, api_key=token, httpx_client=self.http,  # type: ignore[no-untyped-call]
                               max_retries=0, timeout=timeout_s)
        self._timeout_s = timeout_s

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Studio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # the fault model
    # -----------------------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run one SDK call, mapping faults to :mod:`fleet.errors`; retry idempotent ones with backoff."""
        return retrying(self.retry, f"Label Studio {what}", lambda: translate(what, fn), idempotent=idempotent,
                        sleep=self.sleep)

    def _raw(self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None,
             expect: Iterable[int] = (200, 201, 204)) -> httpx.Response:
        """A request the SDK does not wrap, with the SDK's own auth headers."""
        headers = self.sdk._client_wrapper.get_headers()
        try:
            r = self.http.request(method, f"{self.url}/{path.lstrip('/')}", json=json_body, params=params,
                                  headers=headers, timeout=self._timeout_s)
        except httpx.TransportError as exc:
            raise TransportError(f"Label Studio {method} {path}: {type(exc).__name__}: {exc}") from exc
        if r.status_code not in set(expect):
            raise error_for_status(r.status_code, f"Label Studio {method} {path}: HTTP {r.status_code}: "
                                                  f"{response_detail(r)}",
                                   retry_after=parse_retry_after(r.headers.get("retry-after")))
        return r

    # -----------------------------------------------------------------------------------------
    # users
    # -----------------------------------------------------------------------------------------

    def whoami(self) -> tuple[int, str]:
        me = self.call("whoami", lambda: self.sdk.users.whoami())
        return int(me.id), str(me.email or me.username or me.id)

    def users(self) -> dict[int, str]:
        """Every user of the organization: id -> email."""
        users = self.call("list users", lambda: self.sdk.users.list())
        return {int(u.id): str(u.email or u.username or u.id) for u in users}

    def invite_token(self) -> str:
        r = self.call("invite token", lambda: self._raw("GET", "api/invite"))
        return str(r.json()["token"])

    # -----------------------------------------------------------------------------------------
    # project
    # -----------------------------------------------------------------------------------------

    def find_project(self, title: str) -> Project | None:
        found: list[Any] = self.call("list projects",
                                     lambda: list(self.sdk.projects.list(title=title, page_size=100)))
        ids = sorted(int(p.id) for p in found if getattr(p, "title", None) == title)
        return self.get_project(ids[0]) if ids else None

    def get_project(self, project_id: int) -> Project:
        p = self.call(f"get project {project_id}", lambda: self.sdk.projects.get(id=project_id))
        return project_from(_dump(p))

    def ensure_project(self, settings: ProjectSettings) -> Project:
        """The project with ``settings.title``, created or brought in line with ``settings`` (idempotent).

        A labeling config may only gain classes: removing or reordering classes would change what
        existing annotations mean, so it is refused with the two class lists.
        """
        wanted = settings.fields()
        project = self.find_project(settings.title)
        if project is None:
            log.info("creating Label Studio project %r", settings.title)
            p = self.call("create project",
                          lambda: self.sdk.projects.create(title=settings.title, **wanted), idempotent=False)
            return self.get_project(int(p.id or 0))
        old, new = project.class_names, config_classes(settings.label_config)
        if new[: len(old)] != old:
            raise InvalidInput(f"project {project.title!r} labels classes {old}; the new config's classes {new} "
                               f"would change what existing annotations mean (only appending classes is allowed)")
        current = {  # not model_version: see ProjectSettings
            "label_config": project.label_config, "sampling": project.sampling,
            "maximum_annotations": project.maximum_annotations,
            "overlap_cohort_percentage": project.overlap_cohort_percentage,
            "show_collab_predictions": project.show_collab_predictions,
        }
        # Label Studio stores the config without its trailing newline: compare what it means, not its bytes
        current["label_config"] = (project.label_config or "").strip()
        changed = {k: v for k, v in wanted.items()
                   if k in current and current[k] != (v.strip() if k == "label_config" else v)}
        if changed:
            try:
                self.update_project(project.id, **changed)
            except (InvalidInput, NotFound) as exc:  # a 4xx: the same update would be refused again
                raise ProjectUpdateRefused(f"Label Studio refused to update project {project.title!r} "
                                           f"({sorted(changed)}); using it as it is: {exc}", project) from exc
            return self.get_project(project.id)
        return project

    def update_project(self, project_id: int, **fields: Any) -> None:
        log.info("updating Label Studio project %d: %s", project_id, sorted(fields))
        self.call(f"update project {project_id}", lambda: self.sdk.projects.update(id=project_id, **fields))

    def set_queue_version(self, project_id: int, version: str) -> None:
        """Point the project's queue at ``version``. Label Studio refuses (HTTP 400, :class:`InvalidInput`)
        a version that no prediction of the project carries yet: import those predictions first."""
        self.update_project(project_id, model_version=version)

    def delete_project(self, project_id: int) -> None:
        with contextlib.suppress(NotFound):
            self.call(f"delete project {project_id}", lambda: self.sdk.projects.delete(id=project_id))

    # -----------------------------------------------------------------------------------------
    # tasks and predictions
    # -----------------------------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Create tasks (with inline predictions) in one request. Not retried: see :func:`labeling.push`."""
        r = self.call(f"import {len(tasks)} tasks",
                      lambda: self.sdk.projects.import_tasks(id=project_id, request=list(tasks),  # type: ignore[arg-type]
                                                             return_task_ids=True),
                      idempotent=False)
        ids = list(getattr(r, "task_ids", None) or [])
        if len(ids) != len(tasks):
            raise ProtocolError(f"Label Studio imported {len(ids)} task ids for {len(tasks)} tasks: {r}")
        return [int(i) for i in ids]

    def create_task(self, project_id: int, data: dict[str, Any]) -> int:
        """One task, one request (the slow path the benchmark compares the bulk import with)."""
        t = self.call("create task", lambda: self.sdk.tasks.create(project=project_id, data=data), idempotent=False)
        return int(t.id or 0)

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        """Create predictions (``{"task", "result", "score", "model_version"}``) in one request; returns how many
        were created. Not retried: a lost answer does not say whether they exist (Label Studio drops
        ``cluster`` here too; set it afterwards with :meth:`set_clusters`)."""
        if not predictions:
            return 0
        r = self.call(f"import {len(predictions)} predictions",
                      lambda: self.sdk.projects.import_predictions(id=project_id, request=list(predictions)),  # type: ignore[arg-type]
                      idempotent=False)
        return int(getattr(r, "created", None) or 0)

    def create_prediction(self, task_id: int, result: list[dict[str, Any]], *, model_version: str,
                          score: float | None, cluster: int | None) -> int:
        p = self.call(f"create prediction for task {task_id}",
                      lambda: self.sdk.predictions.create(task=task_id, result=result, model_version=model_version,
                                                          score=score, cluster=cluster),
                      idempotent=False)
        return int(p.id)

    def set_clusters(self, clusters: Sequence[tuple[int, int]]) -> dict[int, str]:
        """Set ``cluster`` on predictions, ``[(prediction_id, cluster)]``, a few at a time (idempotent).

        Label Studio's bulk import drops a prediction's cluster, so it is set afterwards, one PATCH each.
        Returns the predictions Label Studio refused (a 4xx, such as a prediction deleted meanwhile) with the
        reason; a retryable fault stops the rest and is raised.
        """
        refused: dict[int, str] = {}

        def one(item: tuple[int, int]) -> None:
            pid, cluster = item
            try:
                self.call(f"set cluster of prediction {pid}",
                          lambda: self.sdk.predictions.update(id=pid, cluster=cluster))
            except (InvalidInput, NotFound) as exc:
                refused[pid] = str(exc)

        if self.workers == 1 or len(clusters) < 2:
            for item in clusters:
                one(item)
            return refused
        pool = ThreadPoolExecutor(self.workers)
        try:
            futures = [pool.submit(one, item) for item in clusters]
            for f in as_completed(futures):
                f.result()  # the first failure stops the rest: Label Studio is down, not slow per item
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return refused

    def get_task(self, task_id: int) -> TaskRecord | None:
        try:
            t = self.call(f"get task {task_id}", lambda: self.sdk.tasks.get(id=str(task_id)))
        except NotFound:
            return None
        return parse_task(_dump(t))

    def iter_tasks(self, project_id: int, *, ids: Sequence[int] | None = None, full: bool = True,
                   page_size: int = 500) -> Iterator[TaskRecord]:
        """Every task of the project (or those with ``ids``), with annotations and predictions when ``full``.

        Each page is fetched with retries; a page that still fails raises, so a caller never
        mistakes a partial listing for the whole project.
        """
        query = json.dumps({"selectedItems": {"all": False, "included": list(ids)}}) if ids is not None else None
        if ids is not None and not ids:
            return
        page = 1
        while True:
            def fetch(page: int = page) -> Any:
                return self.sdk.tasks.list(project=project_id, fields="all" if full else "task_only",
                                           query=query, page=page, page_size=page_size)

            try:
                pager = self.call(f"list tasks of project {project_id} page {page}", fetch)
            except NotFound:
                if page == 1:
                    raise
                return  # Label Studio answers 404 for the page after the last
            items = list(getattr(pager, "items", None) or [])
            for t in items:
                yield parse_task(_dump(t))
            if len(items) < page_size:
                return
            page += 1

    def delete_task(self, task_id: int) -> bool:
        """Delete a task; False when it was already gone."""
        try:
            self.call(f"delete task {task_id}", lambda: self.sdk.tasks.delete(id=str(task_id)))
        except NotFound:
            return False
        return True

    def update_task_data(self, task_id: int, data: dict[str, Any]) -> None:
        self.call(f"update task {task_id}", lambda: self.sdk.tasks.update(id=str(task_id), data=data))

    def next_task(self, project_id: int) -> TaskRecord | None:
        """The task Label Studio's queue gives this user next (uncertainty sampling), or None when empty."""
        try:
            r = self.call(f"next task of project {project_id}",
                          lambda: self._raw("GET", f"api/projects/{project_id}/next"))
        except NotFound:
            return None
        body = r.json()
        return parse_task(body) if isinstance(body, dict) and "id" in body else None

    # -----------------------------------------------------------------------------------------
    # annotations
    # -----------------------------------------------------------------------------------------

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], *, unique_id: str | None = None,
                          ground_truth: bool = False, was_cancelled: bool = False,
                          lead_time: float | None = None) -> AnnotationRecord:
        """Create an annotation as this user. With ``unique_id`` a retry cannot duplicate it: a second
        create with the same ``unique_id`` raises :class:`~fleet.errors.Conflict`."""
        kwargs: dict[str, Any] = {"result": result, "ground_truth": ground_truth, "was_cancelled": was_cancelled}
        if lead_time is not None:
            kwargs["lead_time"] = lead_time
        if unique_id is not None:
            kwargs["unique_id"] = unique_id
        a = self.call(f"annotate task {task_id}", lambda: self.sdk.annotations.create(id=task_id, **kwargs),
                      idempotent=unique_id is not None)
        return parse_annotation(_dump(a), task_id=task_id)

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> AnnotationRecord:
        a = self.call(f"update annotation {annotation_id}",
                      lambda: self.sdk.annotations.update(id=annotation_id, result=result))
        return parse_annotation(_dump(a))

    def delete_annotation(self, annotation_id: int) -> bool:
        try:
            self.call(f"delete annotation {annotation_id}", lambda: self.sdk.annotations.delete(id=annotation_id))
        except NotFound:
            return False
        return True

    def annotations_of(self, task_id: int) -> list[AnnotationRecord]:
        items = self.call(f"annotations of task {task_id}", lambda: self.sdk.annotations.list(id=task_id))
        return [parse_annotation(_dump(a), task_id=task_id) for a in items]

    # -----------------------------------------------------------------------------------------
    # webhooks
    # -----------------------------------------------------------------------------------------

    def ensure_webhook(self, project_id: int, url: str, *, secret: str, actions: Sequence[str]) -> int:
        """One webhook of this project to ``url`` with the secret header and actions (idempotent)."""
        headers = {"X-Flywheel-Webhook-Secret": secret}
        hooks = self.call("list webhooks", lambda: self.sdk.webhooks.list(project=str(project_id)))
        mine = [h for h in hooks if h.url == url and (h.project in (None, project_id))]
        if mine:
            hook = mine[0]
            if sorted(hook.actions or []) != sorted(actions) or (hook.headers or {}) != headers or not hook.is_active:
                self.call("update webhook", lambda: self.sdk.webhooks.update(
                    id=int(hook.id), url=url, actions=list(actions), headers=headers, is_active=True,
                    send_payload=True, send_for_all_actions=False))
            return int(hook.id)
        hook = self.call("create webhook", lambda: self.sdk.webhooks.create(
            url=url, project=project_id, actions=list(actions), headers=headers, send_payload=True,
            send_for_all_actions=False, is_active=True), idempotent=False)
        log.info("Label Studio webhook %s -> %s for %s", hook.id, url, list(actions))
        return int(hook.id)

    def delete_webhooks(self, project_id: int) -> None:
        hooks = self.call("list webhooks", lambda: self.sdk.webhooks.list(project=str(project_id)))
        for h in hooks:
            if h.project == project_id:
                hook_id = int(h.id or 0)
                self.call("delete webhook", lambda hook_id=hook_id: self.sdk.webhooks.delete(id=hook_id))  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def translate(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` and turn SDK and network faults into :mod:`fleet.errors`."""
    try:
        return fn()
    except FlywheelError:
        raise
    except ApiError as exc:
        status = exc.status_code if exc.status_code is not None else 502  # no status: a broken answer
        raise error_for_status(status, f"Label Studio {what}: HTTP {exc.status_code}: {_detail(exc.body)}",
                               retry_after=parse_retry_after((exc.headers or {}).get("retry-after"))) from exc
    except httpx.TimeoutException as exc:
        raise TransportError(f"Label Studio {what}: timed out ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise TransportError(f"Label Studio {what}: {type(exc).__name__}: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        # the SDK could not parse what came back: a proxy's error page, a truncated body
        raise ProtocolError(f"Label Studio {what}: unexpected response ({type(exc).__name__}: {exc})") from exc


def _detail(body: Any) -> str:
    """Label Studio's reason: ``detail`` and, for a "Validation error", the ``validation_errors`` behind it."""
    if isinstance(body, dict) and "detail" in body:
        extra = body.get("validation_errors")
        return str(body["detail"] if extra is None else f"{body['detail']} {extra}")[:500]
    return str(body)[:500]


def _dump(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dumped: dict[str, Any] = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else dict(obj)
    return dumped
