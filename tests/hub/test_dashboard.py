"""The dashboard at /ui: the login and its cookie, every page over a hub with a fleet, campaigns, labels, a
snapshot, models with parents and rollouts; and /v1/devices with each device's spool and evictions."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from fleet.protocol import TriggerHit
from tests.hub.conftest import HubHarness

DEVICES = ("cam-north-1", "cam-north-2", "cam-south-1")


@dataclass
class Loop:
    """What :func:`populate` made, for the checks."""

    cases: list[str]
    labeled: list[str]
    snapshot: str


def populate(h: HubHarness, *, advance: Any = None) -> Loop:
    """A small loop through the hub's API: three devices on m1 send heartbeats and cases (two triggers, one
    campaign), annotators label five, a snapshot is frozen, m2 (parent m1, trained on it) is rolled out and
    rolled back with a reason, and m3 (parent m2) is rolling out. ``advance(seconds)`` moves the clock."""
    advance = advance or h.clock.advance
    for d in DEVICES:
        h.enroll(d, group="north" if "north" in d else "south")
    r = h.client.post("/v1/campaigns", headers=h.admin, json={"spec": {
        "format": "flywheel.trigger/1", "id": "night-rare", "version": 2, "expires_at": "2031-01-01T00:00:00Z",
        "rule": {"any_of": [{"trigger": "entropy", "target_rate": 0.05}, {"trigger": "human_disagreement"}]}},
        "groups": ["north"]})
    assert r.status_code == 201, r.text
    advance(120)
    for i, d in enumerate(DEVICES):
        hb = {"device_id": d, "sent_at": h.clock(), "boot_id": "boot-1", "model_version": "m1",
              "counters": {"frames_seen": 900 + i, "flagged": 40 + i, "uploaded": 30, "evicted": 3 * i},
              "spool_bytes": 2048 * (i + 1) ** 3, "spool_items": 4 * (i + 1), "human_compared": 50,
              "human_disagreed": 5 * (i + 1)}
        r = h.client.post("/v1/heartbeats", json=hb, headers=h.devices[d])
        assert r.status_code == 204, r.text
    cases = []
    for i in range(9):
        d = DEVICES[i % 3]
        triggers = [TriggerHit("entropy", 0.8 + i / 100, 0.7)] + ([TriggerHit("novelty", 0.6, 0.5)] if i % 2 else [])
        extra = {"campaign_id": "night-rare", "campaign_version": 2} if "north" in d else {}
        probs = [[0.5, 0.3, 0.2], [0.2, 0.45, 0.35], [0.3, 0.3, 0.4]][i % 3]
        cases.append(h.send_case(d, probs=probs, triggers=triggers, scores={"entropy": 0.8 + i / 100, "margin": 0.1},
                                 **extra))
    labeled = cases[:5]
    for i, case_id in enumerate(labeled):
        advance(1800)
        r = h.label(case_id, (2 * i) % 3, annotator=["ann@example.com", "bob@example.com"][i % 2])
        assert r.status_code == 200, r.text
    r = h.client.post("/v1/snapshots", json={"name": "turn-1"}, headers=h.trainer)
    assert r.status_code == 201, r.text
    snapshot = r.json()["snapshot_id"]
    h.register_model("m2", parent="m1", data_snapshot=f"hub-snapshot:{snapshot}",
                     metrics={"test_accuracy": 0.71, "test_n": 500.0, "test/condition=night": 0.62})
    r = h.client.post("/v1/rollouts", json={"version": "m2", "stages": [0.34, 1.0]}, headers=h.trainer)
    assert r.status_code == 201, r.text
    rollout = r.json()["rollout_id"]
    r = h.client.post(f"/v1/rollouts/{rollout}/rollback", json={"reason": "canary disagreement rose 12% -> 31%"},
                      headers=h.trainer)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back", r.text
    h.register_model("m3", parent="m2", data_snapshot=snapshot, metrics={"test_accuracy": 0.78, "test_n": 500.0})
    r = h.client.post("/v1/rollouts", json={"version": "m3", "stages": [0.34, 0.67, 1.0]}, headers=h.trainer)
    assert r.status_code == 201, r.text
    return Loop(cases=cases, labeled=labeled, snapshot=snapshot)


def login(h: HubHarness, token: str | None = None) -> Any:
    token = token if token is not None else h.settings.admin_token.get_secret_value()
    return h.client.post("/ui/login", data={"token": token}, follow_redirects=False)


def text_of(html: str) -> str:
    """The page's text, tags dropped and whitespace squeezed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


PAGES = ("/ui/fleet", "/ui/campaigns", "/ui/queue", "/ui/models", "/ui/models/m1", "/ui/cases/x")


def test_pages_redirect_to_the_login_without_a_valid_session(hub: HubHarness) -> None:
    for path in (*PAGES, "/ui", "/ui/"):
        r = hub.client.get(path, follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/ui/login"), path
    hub.client.cookies.set("flywheel_ui", "forged.value.sig", path="/ui")
    assert hub.client.get("/ui/fleet", follow_redirects=False).headers["location"] == "/ui/login"
    hub.client.cookies.clear()
    # a bearer token is not a session: the pages take the cookie only
    assert hub.client.get("/ui/fleet", headers=hub.admin, follow_redirects=False).status_code == 303
    r = hub.client.get("/ui/login")
    assert r.status_code == 200 and 'name="token"' in r.text and 'method="post"' in r.text
    assert not [p for p in hub.app.openapi()["paths"] if p.startswith("/ui")]  # pages, not API


def test_a_wrong_token_shows_an_error_and_sets_no_cookie(hub: HubHarness) -> None:
    for token in ("wrong", "", hub.labeler["Authorization"].split()[1], hub.devices["d1"]["Authorization"].split()[1]):
        r = login(hub, token)
        assert r.status_code == 401, token
        assert "not an admin token of this hub" in r.text
        assert "set-cookie" not in r.headers
    assert hub.client.get("/ui/fleet", follow_redirects=False).status_code == 303


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_it(hub: HubHarness) -> None:
    r = login(hub)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/fleet")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert hub.settings.admin_token.get_secret_value() not in cookie
    assert hub.client.get("/ui/fleet").status_code == 200
    r = hub.client.post("/ui/logout", follow_redirects=False)
    assert r.headers["location"] == "/ui/login"
    hub.client.cookies.clear()  # as the browser does on the Max-Age=0 the logout sent
    assert 'Max-Age=0' in r.headers["set-cookie"] or "expires" in r.headers["set-cookie"].lower()
    assert hub.client.get("/ui/fleet", follow_redirects=False).status_code == 303


def test_a_revoked_admin_token_ends_its_session(hub: HubHarness) -> None:
    token = hub.token("admin", "ops-admin")["Authorization"].split()[1]
    assert login(hub, token).status_code == 303
    page = hub.client.get("/ui/fleet")
    assert page.status_code == 200 and "Log out (ops-admin)" in page.text
    assert hub.client.delete("/v1/tokens/ops-admin", headers=hub.admin).status_code == 200
    assert hub.client.get("/ui/fleet", follow_redirects=False).headers["location"] == "/ui/login"


def test_every_page_shows_the_loop(hub: HubHarness) -> None:
    loop = populate(hub)
    assert login(hub).status_code == 303

    hub.register_model("m4", seed=4)  # the south group gets a model of its own
    r = hub.client.post("/v1/rollouts", json={"version": "m4", "stages": [1.0], "group": "south"},
                        headers=hub.trainer)
    assert r.status_code == 201, r.text
    assert hub.client.post(f"/v1/rollouts/{r.json()['rollout_id']}/advance", headers=hub.trainer).status_code == 200

    fleet = text_of(hub.client.get("/ui/fleet").text)
    for d in DEVICES:
        assert d in fleet
    assert "south 1 m4 its own m1 –" in fleet  # the groups: south runs its own model
    assert re.search(r"north 2 m1 the fleet's – ro-\d+-[0-9a-f]{6}", fleet), fleet  # north: the fleet's canary
    assert "cam-south-1 south m1 2 h ago 12 54.0 KiB 6 30.0% of 50" in fleet  # spool, evictions, disagreement
    assert "Devices per model version" in fleet

    campaigns = text_of(hub.client.get("/ui/campaigns").text)
    assert "entropy 9" in campaigns and "novelty 4" in campaigns  # uploads per trigger
    assert "night-rare v2 6" in campaigns and "(none) 3" in campaigns  # per campaign
    assert "Uploads per day (UTC)" in campaigns and "night-rare 2 north" in campaigns
    # the yield, as GET /v1/yields reports it: 2 of the campaign's 4 labeled cases caught m1 wrong
    assert "night-rare all triggers 6 4 2 50.0% 2.0" in campaigns and "night-rare novelty 3 2 1 50.0% 2.0" in campaigns
    assert "Every device runs the campaigns it was given." in campaigns
    refusal = {"device_id": "cam-north-1", "campaign_id": "night-rare", "version": 2, "refused_at": hub.clock(),
               "reason": "unknown trigger 'entropy' <script>alert(1)</script>"}
    assert hub.client.post("/v1/campaign-refusals", json=refusal, headers=hub.devices["cam-north-1"]).status_code == 204
    page = hub.client.get("/ui/campaigns").text
    assert "<script>alert" not in page and "&lt;script&gt;" in page  # a device's words, escaped
    assert "night-rare 2 cam-north-1 1" in text_of(page) and "unknown trigger &#39;entropy&#39;" in text_of(page)

    queue = text_of(hub.client.get("/ui/queue").text)
    assert "4 in the pool" in queue and "5 labeled" in queue and "Labels per hour" in queue
    assert "accepted 5" in queue and loop.cases[-1] in queue

    models = hub.client.get("/ui/models").text
    assert "Accuracy per model version" in models and "<svg" in models and "<script" not in models
    models = text_of(models)
    assert "m1 active – – – 9 40.0% of 5 20.0%" in models  # 2 of the 5 labels agree with m1; heartbeats: 15 / 150
    assert "m2 retired m1 hub-snapshot:snap-00001 test_accuracy = 0.710" in models
    assert "m3 canary m2 snap-00001 test_accuracy = 0.780" in models
    assert "canary disagreement rose 12% -> 31%" in html.unescape(models)
    assert "m4 m1 group south staged completed" in models and "m4 candidate group south" in models

    m2 = text_of(hub.client.get("/ui/models/m2").text)
    assert "Parent m1" in m2 and "Children m3" in m2 and f"{loop.snapshot} (version 1, “turn-1”, 5 labels" in m2
    assert "Devices cam-north-1 (2), cam-north-2 (2), cam-south-1 (1)" in m2
    assert "Annotators ann@example.com, bob@example.com" in m2 and "Trained on (5 labeled cases)" in m2
    assert "rolled_back" in m2 and "canary disagreement rose" in m2
    assert "test_accuracy: 0.710" in m2 and "test/condition=night 0.62" in m2  # the gate report
    m1 = text_of(hub.client.get("/ui/models/m1").text)
    assert "none (a base model)" in m1 and "heartbeats" in m1 and "3 heartbeats" in m1

    case = hub.client.get(f"/ui/cases/{loop.labeled[0]}")
    assert case.status_code == 200
    assert re.search(rf'<img src="/v1/cases/{loop.labeled[0]}/image\?exp=\d+&amp;sig=[0-9a-f]+"', case.text)
    case_text = text_of(case.text)
    assert "Influenced m2 , m3" in case_text and "entropy 0.800 0.700" in case_text and "margin 0.100" in case_text
    assert "Prediction class_0 (0.50)" in case_text and "Label class_0 accepted" in case_text
    img = re.search(r'<img src="([^"]+)"', case.text)
    assert img is not None
    r = hub.client.get(img.group(1).replace("&amp;", "&"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_unknown_names_render_an_error_page(hub: HubHarness) -> None:
    assert login(hub).status_code == 303
    r = hub.client.get("/ui/models/nope")
    assert r.status_code == 404 and "unknown model version 'nope'" in html.unescape(r.text) and "<html" in r.text
    assert "Log out" in r.text  # the page keeps the navigation of a logged-in admin
    r = hub.client.get("/ui/cases/nope")
    assert r.status_code == 404 and "unknown case 'nope'" in html.unescape(r.text)
    # the JSON API keeps its JSON errors
    assert hub.client.get("/v1/models/nope", headers=hub.admin).json()["detail"] == "unknown model version 'nope'"


def test_device_list_carries_spool_evictions_and_disagreement(hub: HubHarness) -> None:
    populate(hub)
    listed = hub.devices_listed()
    south = listed["cam-south-1"]
    assert (south.spool_bytes, south.spool_items, south.evicted, south.human_compared, south.human_disagreed) == (
        2048 * 27, 12, 6, 50, 15)
    assert south.disagreement == 0.3
    assert (listed["d1"].spool_bytes, listed["d1"].evicted, listed["d1"].disagreement) == (None, 0, None)


def test_the_fleet_page_lists_a_large_fleet_a_page_at_a_time_and_searches_it(bare_hub: HubHarness) -> None:
    """250 devices: the page says how many, lists 100 by id with links to the next and previous pages, finds
    devices by id or group in any case (a % is a character, not a wildcard), and names a bad page or search."""
    h = bare_hub
    for i in range(250):
        h.enroll(f"cam-{i:03d}", group="North" if i % 5 == 0 else "south")
    hb = {"device_id": "cam-105", "sent_at": h.clock(), "boot_id": "boot-1", "model_version": None,
          "counters": {"frames_seen": 10, "evicted": 7}, "spool_bytes": 2048, "spool_items": 3}
    assert h.client.post("/v1/heartbeats", json=hb, headers=h.devices["cam-105"]).status_code == 204
    assert login(h).status_code == 303

    first = h.client.get("/ui/fleet")
    text = text_of(first.text)
    assert "250 devices 1 ever heard from" in text  # the tiles count the whole fleet, not the page
    assert "devices 1–100 of 250 · page 1 of 3" in text and "cam-099" in text and "cam-100" not in text
    assert 'href="/ui/fleet?page=2" rel="next"' in first.text and 'rel="prev"' not in first.text
    assert "devices (none): 250" in first.text  # the chart of devices per model version: none has one yet
    second = h.client.get("/ui/fleet?page=2")
    assert "devices 101–200 of 250 · page 2 of 3" in text_of(second.text)
    row = re.search(r"cam-105 .{0,60}", text_of(second.text))
    assert row and row.group().startswith("cam-105 North none 0 s ago 3 2.0 KiB 7 –"), row  # its heartbeat, on its page
    assert 'href="/ui/fleet?page=1" rel="prev"' in second.text and 'href="/ui/fleet?page=3" rel="next"' in second.text
    last = text_of(h.client.get("/ui/fleet?page=3").text)
    assert "devices 201–250 of 250 · page 3 of 3" in last and "cam-249" in last and "cam-199" not in last

    north = h.client.get("/ui/fleet?q=north")  # by group, in any case
    assert "50 devices holding “north”" in text_of(north.text)
    assert {m for m in re.findall(r"cam-\d{3}", north.text)} == {f"cam-{i:03d}" for i in range(0, 250, 5)}
    assert 'value="north"' in north.text and 'rel="next"' not in north.text
    by_id = text_of(h.client.get("/ui/fleet?q=CAM-24").text)  # by id
    assert "10 devices holding “CAM-24”" in by_id and "cam-249" in by_id and "cam-239" not in by_id
    markup = h.client.get("/ui/fleet", params={"q": '"><b>x'})  # the search comes back as text, never markup
    assert markup.status_code == 200 and "<b>x" not in markup.text and "&#34;&gt;&lt;b&gt;x" in markup.text
    wildcard = h.client.get("/ui/fleet?q=%25")
    assert wildcard.status_code == 200 and "No device's id or group holds “%”." in text_of(wildcard.text)
    many = h.client.get("/ui/fleet?q=south&page=2")
    assert "devices 101–200 of 200 holding “south” · page 2 of 2" in text_of(many.text)
    assert 'href="/ui/fleet?q=south&amp;page=1" rel="prev"' in many.text

    for query, said in (("page=0", "page must be a whole number from 1; received '0'"),
                        ("page=two", "page must be a whole number from 1; received 'two'"),
                        ("page=4", "page 4 is past the last page of devices (3)"),
                        ("page=" + "9" * 30, f"page {'9' * 30} is past the last page of devices (3)"),
                        ("q=north&page=2", "page 2 is past the last page of devices holding 'north' (1)"),
                        ("q=" + "x" * 65, "the search may be at most 64 characters; received 65"),
                        ("q=cam%00", "the search may not hold a NUL character; received 'cam\\x00'")):
        r = h.client.get(f"/ui/fleet?{query}")
        assert r.status_code == 400 and "<html" in r.text, query
        assert said in html.unescape(r.text), (query, text_of(r.text))
