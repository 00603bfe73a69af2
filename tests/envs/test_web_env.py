"""taurl/Web-v0: the generated site, its real HTTP server, the browsing tools, scripted agents."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import gymnasium
import httpx
import pytest

import taurl.envs  # noqa: F401 - registers the environments
from taurl.envs import check_env, run_episode
from taurl.envs.web import WebEnv, failing_policy, html_to_text, normalize_answer, oracle_policy
from taurl.envs.websim import SiteServer, generate_site


def _call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture
def env() -> Iterator[WebEnv]:
    web = WebEnv("train")
    yield web
    web.close()


def test_site_is_deterministic_and_linked() -> None:
    a, b = generate_site(7), generate_site(7)
    assert a.people == b.people and a.cities == b.cities and a.pages.keys() == b.pages.keys()
    assert generate_site(8).people != a.people
    person = a.people[0]
    city = next(c for c in a.cities if c["name"] == person["born_in"])
    assert f'href="{city["url"]}"' in a.pages[person["url"]].body_html
    country = next(c for c in a.countries if c["name"] == city["country"])
    assert f'href="{country["url"]}"' in a.pages[city["url"]].body_html
    assert a.search(person["name"])[0]["url"] == person["url"]


def test_server_serves_pages_search_and_404_over_http() -> None:
    site = generate_site(0)
    server = SiteServer(site)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        person = site.people[3]
        page = httpx.get(server.url + person["url"])
        assert page.status_code == 200 and person["born_in"] in page.text
        found = httpx.get(server.url + "/search", params={"q": person["name"]}).json()
        assert found["results"][0]["url"] == person["url"]
        assert httpx.get(server.url + "/wiki/nobody-here").status_code == 404
    finally:
        server.close()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_check_env_passes(split: str) -> None:
    web = gymnasium.make("taurl/Web-v0", split=split)
    check_env(web)
    web.close()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_oracle_solves_and_failing_policy_fails(split: str) -> None:
    web = WebEnv(split)
    kinds = set()
    try:
        for seed in range(6):
            solved = run_episode(web, oracle_policy, seed=seed)
            assert solved.error is None and solved.success is True and solved.rewards[-1] == 1.0
            assert (
                sum(solved.rewards) == 1.0 and len(solved.rewards) >= 4
            )  # search + >= 2 hops + answer
            kinds.add(web.task.metadata["kind"])
            failed = run_episode(web, failing_policy, seed=seed)
            assert failed.error is None and failed.success is False and failed.rewards == [0.0]
    finally:
        web.close()
    expected = (
        {"born_country", "born_currency"}
        if split == "train"
        else {"mayor_year", "capital_language"}
    )
    assert kinds == expected


def test_tools_browse_the_site(env: WebEnv) -> None:
    env.reset(seed=0)
    person = env.site.people[5]
    obs, _, _, _, info = env.step(_call("search", query=person["name"]))
    assert info["tool_errors"] == 0 and f"[{person['url']}]" in obs[0]["content"]
    obs, *_ = env.step(_call("open_url", url=person["url"]))
    assert f"born in {person['born_in']} [" in obs[0]["content"]
    obs, *_ = env.step(_call("find_in_page", text="born in"))
    assert obs[0]["content"].count("\n") == 2  # exactly one matching line inside the block


def test_tool_failures_are_observations(env: WebEnv) -> None:
    env.reset(seed=0)
    obs, reward, _, _, info = env.step(_call("find_in_page", text="x"))
    assert info["tool_errors"] == 1 and "no page is open" in obs[0]["content"]
    assert reward == -env.format_penalty
    obs, _, _, _, info = env.step(_call("open_url", url="/wiki/does-not-exist"))
    assert info["tool_errors"] == 1 and "404" in obs[0]["content"]


def test_retries_hide_transient_5xx_errors() -> None:
    web = WebEnv("train", fail_every=2)  # every second request answers 503
    try:
        web.reset(seed=0)
        for _ in range(3):
            obs, _, _, _, info = web.step(_call("search", query=web.site.people[0]["name"]))
            assert info["tool_errors"] == 0, obs
        assert web._server is not None and web._server.failures >= 2
    finally:
        web.close()


def test_base_url_points_the_tools_at_another_server() -> None:
    server = SiteServer(generate_site(0))
    web = WebEnv("heldout", base_url=server.url)
    try:
        result = run_episode(web, oracle_policy, seed=1)
        assert result.success is True
        assert web._server is None  # no local server was started
        assert server.requests >= 3
    finally:
        web.close()
        server.close()


def test_unreachable_site_is_a_tool_error_not_a_crash() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = WebEnv("train", base_url=f"http://127.0.0.1:{port}", http_retries=2)
    try:
        web.reset(seed=0)
        obs, _, terminated, _, info = web.step(_call("search", query="anything"))
        assert info["tool_errors"] == 1 and "ConnectError" in obs[0]["content"] and not terminated
    finally:
        web.close()


def test_close_stops_the_local_server() -> None:
    web = WebEnv("train")
    web.reset(seed=0)
    web.step(_call("search", query="a"))
    url = web.base_url
    web.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/", timeout=2)


def test_answer_normalisation_and_scoring(env: WebEnv) -> None:
    env.reset(seed=0)
    task = env.task
    assert normalize_answer(" The  Lumer-crown!") == "the lumer crown"
    assert env.score(task, str(task.answer).upper() + ".")
    assert env.score(task, f"It is {task.answer}")
    assert not env.score(task, "no idea")
    every_name = " ".join(c["name"] for c in env.site.countries) + " " + str(task.answer)
    assert not env.score(task, every_name)  # listing everything is not an answer


def test_html_to_text() -> None:
    doc = '<html><head><title>T</title></head><body><p>A <a href="/x">link</a>.</p><li>b</li></body></html>'
    assert html_to_text(doc) == "A link [/x].\nb"
