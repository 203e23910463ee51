//! The status page in a real browser: headless Chromium, driven over WebDriver
//! (`blendnet_tests::webdriver`), against real daemons rendering a real scene with real Blender.
//!
//! The mesh is a node with a `[cloud]` table of the local provider (`a`, which also renders and
//! serves the page), a member joined by invite (`b`) and a "cloud instance" that `a` started
//! with `blendnet cloud up` (a process on this machine, billed at a price per hour), so every
//! page has something real to show, the cloud page included.
//!
//! It logs in through `blendnet web`'s one-time link, sees the peers, watches a job's merged
//! preview change as slices land and the job reach 100% on the jobs page, cancels a second job
//! with the page's Cancel button (and reads the cancellation back from the API), reads where the
//! finished job's time went, and checks that a second use of the link and requests without the
//! session cookie are refused. On the way it saves the screenshots of `docs/web/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blendnet_tests::webdriver::Browser;
use blendnet_tests::{
    HttpResponse, Node, blender, blender_scene, e2e, eventually, http_get, online_peers,
};
use serde_json::Value;

/// A job of the sizes used here finishes well within this on a loaded 2-core machine.
const JOB_WITHIN: Duration = Duration::from_secs(150);
/// How long the page may take to show what the API already says: an event or a 5 s poll, and
/// Chromium's own pace on a busy machine.
const PAGE_WITHIN: Duration = Duration::from_secs(30);
/// How long a `blendnet cloud up` instance may take to start, enroll and come online.
const INSTANCE_WITHIN: Duration = Duration::from_secs(45);
/// The price of an hour of the local instance, in US dollars.
const INSTANCE_PRICE: f64 = 0.9;
/// The tallest full-page screenshot.
const MAX_SHOT_HEIGHT: u32 = 2400;

/// Where the screenshots go: `docs/web/` of the repository.
fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("docs")
        .join("web")
}

/// Saves a full-page screenshot as `docs/web/NAME.png`.
fn shoot(browser: &Browser, name: &str) -> Result<()> {
    let png = browser.page_screenshot(MAX_SHOT_HEIGHT)?;
    ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let dir = shots_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.png"));
    fs::write(&path, png).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("saved {}", path.display());
    Ok(())
}

/// [`Browser::wait`], and when it fails, the page's text and a screenshot (saved in the temporary
/// directory) in the error, so a CI log shows what the page showed.
fn wait<T>(
    browser: &Browser,
    what: &str,
    timeout: Duration,
    f: impl FnMut(&Browser) -> Result<T>,
) -> Result<T> {
    browser.wait(what, timeout, f).map_err(|err| {
        let text = browser
            .execute("return document.body.innerText;", &[])
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("(no text: {e})"));
        let shot = std::env::temp_dir().join("blendnet-web-failure.png");
        let saved = browser
            .screenshot()
            .and_then(|png| Ok(fs::write(&shot, png)?))
            .map(|()| format!("screenshot: {}", shot.display()))
            .unwrap_or_else(|e| format!("no screenshot: {e}"));
        err.context(format!(
            "the page at {} showed ({saved}):\n{text}",
            browser.url().unwrap_or_default()
        ))
    })
}

/// Shows `route` (`#/jobs`) in the page without reloading it (the event stream stays open).
fn open(browser: &Browser, route: &str) -> Result<()> {
    browser.execute("location.hash = arguments[0];", &[Value::from(route)])?;
    Ok(())
}

/// The text of the first element matching `selector`.
fn text_of(browser: &Browser, selector: &str) -> Result<String> {
    browser.text(&browser.find(selector)?)
}

/// An attribute of the first element matching `selector`; an error when it is missing.
fn attr_of(browser: &Browser, selector: &str, name: &str) -> Result<String> {
    browser
        .attribute(&browser.find(selector)?, name)?
        .with_context(|| format!("{selector} has no {name}"))
}

/// The job's state as one word (`Active`, `Done`, `Cancelled`, `Failed`), as the API says.
fn api_state(node: &Node, job: &str) -> Result<String> {
    let view = node.cli_json(&["status", job, "--json"])?;
    Ok(match &view["summary"]["status"] {
        Value::String(s) => s.clone(),
        Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
        other => other.to_string(),
    })
}

/// A request with neither token nor cookie.
fn anonymous(addr: std::net::SocketAddr, path: &str) -> Result<HttpResponse> {
    http_get(addr, path, None)
}

/// Terminates the cloud instances `node` started when dropped: they run in their own process
/// group, so they would outlive the test.
struct Instances<'a>(&'a Node);

impl Drop for Instances<'_> {
    fn drop(&mut self) {
        let _ = self.0.cli(&["cloud", "down", "--all"]);
    }
}

#[test]
fn the_status_page_shows_the_mesh_its_jobs_and_their_previews_and_cancels_a_job() {
    e2e(|| {
        let started = Instant::now();
        // First, so that a machine without Chromium fails at once and says what to install.
        let browser = Browser::start()?;
        let blender = blender();
        let blender = blender.to_str().context("the Blender path is not UTF-8")?;

        // The mesh: a (renders, submits, serves the page, provisions), b, and an instance.
        let (mut a, _) = Node::init("a")?;
        fs::write(
            a.data_dir().join("blendnet.toml"),
            format!(
                "[cloud]\nprovider = \"local\"\nlocal_price_per_hour = {INSTANCE_PRICE:?}\n\
                 local_args = [\"--listen\", \"/ip4/127.0.0.1/tcp/0\", \"--api\", \"127.0.0.1:0\", \
                 \"--no-mdns\", \"--blender\", {blender:?}]\n"
            ),
        )?;
        let addr = a.up(&["--blender", blender])?;
        let mut b = Node::new("b")?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&["--blender", blender])?;
        let instance_id = a.cli_ok(&["cloud", "up"])?.trim().to_owned();
        let _instances = Instances(&a);
        let (a_id, b_id) = (a.peer_id()?, b.peer_id()?);
        let instance_peer = eventually(INSTANCE_WITHIN, Duration::from_millis(250), || {
            let peers = a.peers()?;
            ensure!(
                online_peers(&b.peers()?)?.contains(&a_id),
                "b does not see a online yet"
            );
            let online = online_peers(&peers)?;
            ensure!(online.contains(&b_id), "a does not see b online yet");
            online
                .into_iter()
                .find(|p| *p != a_id && *p != b_id)
                .with_context(|| format!("the instance is not online yet: {peers}"))
        })?;
        eprintln!("mesh up after {:.1?}", started.elapsed());

        // Without a session, the page and the API are refused.
        ensure!(
            anonymous(addr, "/")?.status == 401,
            "GET / without a cookie"
        );
        ensure!(
            anonymous(addr, "/v1/jobs")?.status == 401,
            "GET /v1/jobs without a cookie"
        );

        // Log in through the one-time link; it lands on the mesh page.
        let out = a.cli_ok(&["web", "--no-open"])?;
        let link = out
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .context("`blendnet web` printed nothing")?
            .to_owned();
        ensure!(
            link.starts_with(&format!("http://{addr}/login?code=")),
            "`blendnet web` printed {out:?}, not a login link to {addr}"
        );
        browser.goto(&link)?;
        ensure!(
            browser.url()?.starts_with(&format!("http://{addr}/")),
            "the login link led to {}",
            browser.url()?
        );
        // The link is spent.
        let path = &link[link.find("/login").context("no /login in the link")?..];
        let again = anonymous(addr, path)?;
        ensure!(
            again.status == 401,
            "a second use of the login link answered {}: {}",
            again.status,
            again.body
        );
        // The session cookie is out of the page's scripts' reach.
        let cookies = browser.execute("return document.cookie;", &[])?;
        ensure!(
            !cookies
                .as_str()
                .unwrap_or_default()
                .contains("blendnet_session"),
            "the session cookie is readable by scripts: {cookies}"
        );

        // The mesh page lists the three peers online, each with its Blender.
        wait(&browser, "the three peers online", PAGE_WITHIN, |br| {
            let peers = a.peers()?;
            for id in [&a_id, &b_id, &instance_peer] {
                let row = br.find(&format!("#peers tr[data-peer-id='{id}']"))?;
                ensure!(
                    br.attribute(&row, "data-online")?.as_deref() == Some("true"),
                    "{id} is not shown online"
                );
                let peer = peers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["peer_id"] == id.as_str())
                    .context("peer")?;
                let version = peer["blender"].as_str().context("no Blender version")?;
                let text = br.text(&row)?;
                ensure!(
                    text.contains(version) && text.contains("Online"),
                    "{id}'s row does not show Blender {version}: {text}"
                );
            }
            Ok(())
        })?;
        eprintln!("logged in, peers shown after {:.1?}", started.elapsed());

        // A real scene: a colored cube on a floor, two frames sliced by samples.
        let dir = a.data_dir().with_file_name("project");
        fs::create_dir_all(&dir)?;
        blender_scene(
            &dir,
            "shot",
            "scene.cycles.samples = 256\n\
             scene.cycles.use_adaptive_sampling = False\n\
             scene.render.resolution_x = 320\n\
             scene.render.resolution_y = 240\n\
             scene.render.image_settings.file_format = 'PNG'\n\
             scene.render.filepath = '//render/shot_'\n\
             mat = bpy.data.materials.new('Paint')\n\
             mat.use_nodes = True\n\
             mat.node_tree.nodes['Principled BSDF'].inputs['Base Color'].default_value = (0.9, 0.35, 0.05, 1)\n\
             cube = bpy.data.objects['Cube']\n\
             cube.data.materials.clear()\n\
             cube.data.materials.append(mat)\n\
             bpy.ops.mesh.primitive_plane_add(size=20, location=(0, 0, -1))",
        )?;
        let hash = a
            .cli_ok(&["store", "add", dir.to_str().context("path")?])?
            .trim()
            .to_owned();
        let submit = |name: &str, frames: &str, samples: &str| -> Result<String> {
            Ok(a.cli_ok(&[
                "submit",
                &hash,
                "--blend",
                "shot.blend",
                "--name",
                name,
                "--frames",
                frames,
                "--samples",
                samples,
                "--split",
                "samples",
                "--target-task-secs",
                "1",
            ])?
            .trim()
            .to_owned())
        };
        let job = submit("Shot 010 lookdev", "1-2", "256")?;

        // Its page: the merged preview appears, then changes as more slices land.
        open(&browser, &format!("#/jobs/{job}"))?;
        let first = wait(&browser, "the first preview", JOB_WITHIN, |br| {
            let digest = attr_of(br, "#preview", "data-digest")?;
            Ok((digest, br.element_screenshot(&br.find("#preview")?)?))
        })?;
        // The new image may reach the screen a frame after its digest does: what must change
        // within the wait is what is shown, not only the bytes fetched.
        let second = wait(
            &browser,
            "the image on the page to change",
            JOB_WITHIN,
            |br| {
                let digest = attr_of(br, "#preview", "data-digest")?;
                ensure!(digest != first.0, "the preview is still {digest}");
                let shot = br.element_screenshot(&br.find("#preview")?)?;
                ensure!(
                    shot != first.1,
                    "the preview's bytes changed ({} → {digest}) but the image on the page looks the same",
                    first.0
                );
                Ok(digest)
            },
        )?;
        eprintln!(
            "preview changed {} → {} after {:.1?}",
            first.0,
            second,
            started.elapsed()
        );

        // The jobs page: the job reaches 100%.
        open(&browser, "#/jobs")?;
        let row = format!("#jobs-table tr[data-job-id='{job}']");
        let mut seen = Vec::new();
        wait(
            &browser,
            "the job at 100% on the jobs page",
            JOB_WITHIN,
            |br| {
                let percent = attr_of(br, &format!("{row} .job-bar"), "data-percent")?;
                if seen.last() != Some(&percent) {
                    seen.push(percent.clone());
                }
                let state = attr_of(br, &row, "data-state")?;
                ensure!(
                    percent == "100" && state == "Done",
                    "the job is {state} at {percent}%"
                );
                Ok(())
            },
        )?;
        ensure!(
            seen.len() >= 2,
            "the jobs page never showed the job below 100% ({seen:?}): it is sized to take \
             longer than its preview takes to change"
        );
        ensure!(
            api_state(&a, &job)? == "Done",
            "the page says done, the API does not"
        );
        eprintln!(
            "the jobs page showed {seen:?} % and Done after {:.1?}",
            started.elapsed()
        );

        // A second, long job: the peers render it (the mesh page says so), then the page
        // cancels it.
        let long = submit("Shot 020 animation", "1-24", "4096")?;
        open(&browser, "#/mesh")?;
        wait(
            &browser,
            "a peer rendering the second job",
            PAGE_WITHIN,
            |br| {
                ensure!(
                    !br.find_all(&format!("#peers .current-task a[href='#/jobs/{long}']"))?
                        .is_empty(),
                    "nobody shows the second job as its task"
                );
                Ok(())
            },
        )?;
        shoot(&browser, "mesh")?;
        open(&browser, "#/jobs")?;
        let long_row = format!("#jobs-table tr[data-job-id='{long}']");
        wait(&browser, "the second job's progress", PAGE_WITHIN, |br| {
            let done: u64 = attr_of(br, &format!("{long_row} .job-bar"), "data-done")?.parse()?;
            ensure!(done > 0, "no progress shown yet");
            Ok(())
        })?;
        shoot(&browser, "jobs")?;
        let cancel = browser.find(&format!(
            "{long_row} button[data-action='cancel'][data-job-id='{long}']"
        ))?;
        browser.click(&cancel)?;
        let confirm = browser.wait_for(
            &format!("{long_row} button[data-action='confirm-cancel']"),
            PAGE_WITHIN,
        )?;
        browser.click(&confirm)?;
        wait(
            &browser,
            "the second job cancelled on the page",
            PAGE_WITHIN,
            |br| {
                let state = attr_of(br, &long_row, "data-state")?;
                ensure!(state == "Cancelled", "the page shows it {state}");
                Ok(())
            },
        )?;
        ensure!(
            api_state(&a, &long)? == "Cancelled",
            "the API does not report the second job cancelled"
        );
        eprintln!("cancelled from the page after {:.1?}", started.elapsed());

        // The finished job's page: where the time went, per phase and per peer, as the API's
        // statistics say.
        open(&browser, &format!("#/jobs/{job}"))?;
        wait(&browser, "the finished job's chart", PAGE_WITHIN, |br| {
            // Read each time: a late backup's report may still add a peer.
            let view = a.cli_json(&["status", &job, "--json"])?;
            let mut peers_in_stats: Vec<String> = view["stats"]["peers"]
                .as_array()
                .context("the job's stats name no peers")?
                .iter()
                .filter_map(|p| p["peer"].as_str().map(str::to_owned))
                .collect();
            peers_in_stats.sort();
            ensure!(
                attr_of(br, "#job-head", "data-state")? == "Done",
                "the job page does not show it done"
            );
            ensure!(
                !br.find_all("#time-chart g.phase")?.is_empty(),
                "no phase in the chart"
            );
            let mut shown = Vec::new();
            for bar in br.find_all("#peer-chart tr.peer-bar")? {
                shown.extend(br.attribute(&bar, "data-peer-id")?);
            }
            shown.sort();
            ensure!(
                shown == peers_in_stats,
                "the chart shows peers {shown:?}, the stats {peers_in_stats:?}"
            );
            ensure!(
                attr_of(br, "#preview", "data-digest").is_ok(),
                "no preview on the finished job's page"
            );
            Ok(())
        })?;
        let render = text_of(&browser, "#time-legend tr[data-phase='render_ms']")?;
        ensure!(
            render.contains('%'),
            "the legend gives no share of render time: {render}"
        );
        shoot(&browser, "job")?;

        // The cloud page: the instance, its type, and what it cost so far.
        open(&browser, "#/cloud")?;
        wait(
            &browser,
            "the instance on the cloud page",
            PAGE_WITHIN,
            |br| {
                let row = br.find(&format!("#instances tr[data-instance-id='{instance_id}']"))?;
                let text = br.text(&row)?;
                ensure!(
                    text.contains("local") && text.contains('$'),
                    "the instance row shows {text}"
                );
                ensure!(
                    text_of(br, "#cloud-total")?.starts_with('$'),
                    "no total cost"
                );
                Ok(())
            },
        )?;
        shoot(&browser, "cloud")?;

        // Still refused without the cookie, whatever the browser holds.
        ensure!(
            anonymous(addr, &format!("/v1/jobs/{job}"))?.status == 401,
            "a job's view without a cookie"
        );
        ensure!(
            anonymous(addr, "/web/app.js")?.status == 401,
            "the page's script without a cookie"
        );
        eprintln!("done after {:.1?}", started.elapsed());
        Ok(())
    });
}
