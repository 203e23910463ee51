//! The README's tour, run line by line as written: two nodes on one machine make a mesh, and a
//! scene renders across both with the commands the README shows. If the README changes, this
//! runs the new lines; if a line stops working, this fails.
//!
//! The lines are taken from the `sh` blocks of the section "A 5-minute tour". Only what a
//! reader would fill in is replaced: `/tmp/tour/...` becomes a folder of this test, the `.blend`
//! path a scene made here, `BN1...` the code `invite` printed, and `JOB` the job `blendnet jobs`
//! lists. `blendnet` is the binary under test; a line ending in `&` runs in the background, and
//! the next line waits until that daemon answers (and, after a `join`, until it is a member),
//! as a reader would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use blendnet_tests::{
    blender, blendnet_bin, e2e, eventually, local_render, make_scene, pixel_difference, run_bounded,
};
use serde_json::Value;

/// The longest a line may take: `render --wait` renders a small frame on a loaded 2-core machine.
const LINE_WITHIN: Duration = Duration::from_secs(240);

/// The shell lines of the README's tour, comments and blank lines left out.
fn tour_lines() -> Result<Vec<String>> {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let start = readme
        .find("## A 5-minute tour")
        .context("the README has no section \"A 5-minute tour\"")?;
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            text if in_sh => {
                let code = text.split(" #").next().unwrap_or_default().trim();
                if !code.is_empty() && !code.starts_with('#') {
                    lines.push(code.to_owned());
                }
            }
            _ => {}
        }
    }
    ensure!(!lines.is_empty(), "the tour has no shell lines");
    Ok(lines)
}

/// The state a reader's shell keeps between lines.
struct Shell {
    bin: PathBuf,
    blender: PathBuf,
    root: PathBuf,
    scene: PathBuf,
    data_dir: Option<PathBuf>,
    joined: bool,
    code: Option<String>,
    job: Option<String>,
    daemons: Vec<Child>,
}

impl Drop for Shell {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            // SIGTERM first, so the daemons stop their Blenders; then make sure.
            let _ = Command::new("kill").arg(d.id().to_string()).status();
        }
        for d in &mut self.daemons {
            for _ in 0..100 {
                if d.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Shell {
    /// The word as the reader would type it.
    fn fill(&self, word: &str) -> Result<String> {
        Ok(if let Some(rest) = word.strip_prefix("/tmp/tour") {
            format!("{}{rest}", self.root.display())
        } else if word.ends_with(".blend") {
            self.scene.display().to_string()
        } else if word == "BN1..." {
            self.code.clone().context("BN1... before any invite")?
        } else if word == "JOB" {
            self.job.clone().context("JOB before any job")?
        } else {
            word.to_owned()
        })
    }

    fn command(&self, args: &[String]) -> Result<Command> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("BLENDNET_BLENDER", &self.blender);
        match &self.data_dir {
            Some(dir) => cmd.env("BLENDNET_DATA_DIR", dir),
            None => bail!("a blendnet line before any `export BLENDNET_DATA_DIR`"),
        };
        Ok(cmd)
    }

    /// `blendnet ARGS` in the current data dir; its stdout.
    fn run(&self, args: &[String]) -> Result<String> {
        let out = run_bounded(&mut self.command(args)?, LINE_WITHIN)?;
        ensure!(
            out.status.success(),
            "`blendnet {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&self) -> Result<Value> {
        let text = self.run(&["status".into(), "--json".into()])?;
        Ok(serde_json::from_str(&text)?)
    }

    fn line(&mut self, line: &str) -> Result<()> {
        if let Some(dir) = line.strip_prefix("export BLENDNET_DATA_DIR=") {
            self.data_dir = Some(PathBuf::from(self.fill(dir)?));
            self.joined = false;
            return Ok(());
        }
        let (line, background) = match line.strip_suffix('&') {
            Some(l) => (l.trim(), true),
            None => (line, false),
        };
        let mut words = line.split_whitespace();
        ensure!(
            words.next() == Some("blendnet"),
            "not a blendnet line: {line}"
        );
        let args: Vec<String> = words.map(|w| self.fill(w)).collect::<Result<_>>()?;
        if background {
            let dir = self.data_dir.clone().context("no data dir")?;
            let log = fs::File::create(dir.with_extension("log"))?;
            let child = self
                .command(&args)?
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            self.daemons.push(child);
            // The reader waits until the daemon answers and, after a join, is a member.
            let joined = self.joined;
            return eventually(Duration::from_secs(60), Duration::from_millis(250), || {
                let status = self.status()?;
                ensure!(
                    !joined || status["member"] == true,
                    "not a member yet: {status}"
                );
                Ok(())
            })
            .with_context(|| {
                format!(
                    "after `{line}`; its log:\n{}",
                    tail(&dir.with_extension("log"))
                )
            });
        }
        let out = self.run(&args)?;
        match args.first().map(String::as_str) {
            Some("invite") => self.code = Some(out.trim().to_owned()),
            Some("join") => self.joined = true,
            Some("render") => {
                // The id `blendnet jobs` lists for it: the tour renders one job.
                let jobs: Value =
                    serde_json::from_str(&self.run(&["jobs".into(), "--json".into()])?)?;
                let job = match jobs.as_array().map(Vec::as_slice) {
                    Some([job]) => job["id"].as_str(),
                    _ => None,
                }
                .with_context(|| format!("not one job listed after render: {jobs}"))?;
                self.job = Some(job.to_owned());
            }
            Some("jobs") => {
                let job = self.job.as_deref().unwrap_or_default();
                ensure!(
                    out.contains(job),
                    "`blendnet jobs` does not list {job}:\n{out}"
                );
            }
            _ => {}
        }
        Ok(())
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn the_readme_tour_renders_a_scene_across_two_local_nodes() {
    e2e(|| {
        let root = tempfile::Builder::new()
            .prefix("blendnet-tour-")
            .tempdir()?;
        let scene = root.path().join("projects/shot/shot.blend");
        // Enough samples that the frame is sliced (at most 256: Blender 3.4's default pattern
        // slices exactly there).
        make_scene(
            &scene,
            "scene.cycles.samples = 128\n\
             scene.render.resolution_x = 160\n\
             scene.render.resolution_y = 120",
        )?;
        let mut shell = Shell {
            bin: blendnet_bin()?,
            blender: blender(),
            root: root.path().to_path_buf(),
            scene: scene.clone(),
            data_dir: None,
            joined: false,
            code: None,
            job: None,
            daemons: Vec::new(),
        };
        for line in tour_lines()? {
            shell
                .line(&line)
                .with_context(|| format!("README tour line `{line}`"))?;
        }
        let job = shell.job.clone().context("the tour rendered nothing")?;
        // The frame is where the scene's output path says, and where `fetch` put it.
        let frame = scene.with_file_name("render/shot_0001.png");
        ensure!(frame.exists(), "no frame at {}", frame.display());
        let fetched = root.path().join("frames/shot_0001.png");
        ensure!(
            fetched.exists(),
            "`fetch` left no frame at {}",
            fetched.display()
        );
        ensure!(
            fs::read(&frame)? == fs::read(&fetched)?,
            "the fetched frame differs"
        );
        // Both nodes rendered slices of it.
        let view: Value =
            serde_json::from_str(&shell.run(&["status".into(), job.clone(), "--json".into()])?)?;
        let renderers: std::collections::BTreeSet<&str> = view["tasks"]
            .as_array()
            .context("tasks")?
            .iter()
            .filter(|t| t["task"]["kind"] == "render" && t["in_cover"] == true)
            .filter_map(|t| t["results"][0][0].as_str())
            .collect();
        ensure!(
            renderers.len() == 2,
            "rendered by {renderers:?}, not by both nodes"
        );
        // And it is the frame `blender -b` renders (to a rounding step of 8-bit PNG).
        let local = local_render(&scene, root.path(), "1")?.remove(0);
        let (worst, _) = pixel_difference(&frame, &local);
        ensure!(worst <= 1.0 + 1e-6, "{worst}/255 from the local render");
        drop(shell);
        Ok(())
    });
}
