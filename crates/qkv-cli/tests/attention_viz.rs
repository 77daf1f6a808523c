//! `qkv attention` as a person uses it: PNGs for every layer and head whose size fits their
//! labels, attention.json whose rows are distributions, and the HTML viewer opened in headless
//! Chromium — a screenshot is taken and the rendered DOM must hold the expected number of maps,
//! thumbnails, labels and cells.
//!
//! Chromium is Debian's `chromium` package, which `.ci/run` installs. Without it the browser
//! part says so and passes, unless QKV_REQUIRE_CHROMIUM=1 (set by `.ci/run` once installed).

mod common;

use common::{qkv, scratch, tiny_model};
use qkv::model::Family;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let be = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    (be(16), be(20))
}

fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("QKV_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
    if found.is_none() {
        assert!(
            std::env::var("QKV_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "QKV_REQUIRE_CHROMIUM=1 but no chromium was found"
        );
        eprintln!("skipping the browser check: chromium not found (apt-get install chromium)");
    }
    found
}

/// Headless Chromium with the flags a closed network needs (no background connections).
fn browser(bin: &Path, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

fn attr(dom: &str, name: &str) -> usize {
    let key = format!("{name}=\"");
    let start = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in the DOM"))
        + key.len();
    dom[start..].split('"').next().unwrap().parse().unwrap()
}

#[test]
fn translation_attention_maps_png_json_and_browser() {
    let model = tiny_model(Family::Seq2seq, "viz-s2s");
    let out = scratch("viz-out");
    let out_s = out.to_str().unwrap();
    let model_s = model.to_str().unwrap();
    let (ok, _, err) = qkv(
        &[
            "attention",
            "--model",
            model_s,
            "--input",
            "the king went to the house",
            "--target",
            "great people",
            "--out",
            out_s,
        ],
        None,
    );
    assert!(ok, "{err}");

    let data: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attention.json")).unwrap())
            .unwrap();
    let src = data["source_tokens"].as_array().unwrap().len();
    let tgt = data["target_tokens"].as_array().unwrap().len();
    assert_eq!(data["target_tokens"][0], "<s>");
    let maps = data["maps"].as_array().unwrap();
    // tiny preset: 2 encoder and 2 decoder layers of 4 heads; 3 kinds of map.
    assert_eq!(maps.len(), 2 + 2 + 2);
    let mut heads = 0;
    for m in maps {
        let (h, q, k) = (
            m["heads"].as_u64().unwrap() as usize,
            m["queries"].as_u64().unwrap() as usize,
            m["keys"].as_u64().unwrap() as usize,
        );
        let (eq, ek) = match m["kind"].as_str().unwrap() {
            "encoder_self" => (src, src),
            "decoder_self" => (tgt, tgt),
            "cross" => (tgt, src),
            other => panic!("kind {other}"),
        };
        assert_eq!((q, k), (eq, ek));
        let w: Vec<f64> = m["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(w.len(), h * q * k);
        for (r, row) in w.chunks(k).enumerate() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-4, "row sum");
            // Masked self-attention never looks ahead.
            if m["kind"] == "decoder_self" {
                let i = r % q;
                assert!(
                    row[i + 1..].iter().all(|&x| x == 0.0),
                    "decoder row {i} sees the future"
                );
            }
        }
        heads += h;
        for head in 1..=h {
            let name = format!(
                "{}-layer{}-head{head}.png",
                m["kind"].as_str().unwrap().replace('_', "-"),
                m["layer"].as_u64().unwrap() + 1
            );
            let (pw, ph) = png_size(&out.join(&name));
            // 26-pixel cells plus label margins.
            assert!(
                pw > 26 * k as u32 && pw < 26 * k as u32 + 400,
                "{name}: width {pw}"
            );
            assert!(
                ph > 26 * q as u32 && ph < 26 * q as u32 + 500,
                "{name}: height {ph}"
            );
        }
    }
    let pngs = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(pngs, heads);

    // Bad input fails cleanly.
    let (ok, _, err) = qkv(
        &[
            "attention",
            "--model",
            model_s,
            "--input",
            "  ",
            "--out",
            out_s,
        ],
        None,
    );
    assert!(!ok && err.contains("--input is empty"), "{err}");
    let (ok, _, err) = qkv(
        &[
            "attention",
            "--model",
            out_s,
            "--input",
            "x",
            "--out",
            out_s,
        ],
        None,
    );
    assert!(!ok && err.contains("config.json"), "{err}");

    // A linear-attention model has no weights to show; embeddings need an encoder.
    let lm = tiny_model(Family::Lm, "viz-linear");
    let cfg = std::fs::read_to_string(lm.join("config.json")).unwrap();
    assert!(cfg.contains("\"flash\""));
    std::fs::write(
        lm.join("config.json"),
        cfg.replace("\"flash\"", "\"linear\""),
    )
    .unwrap();
    let lm_s = lm.to_str().unwrap();
    let (ok, _, err) = qkv(
        &[
            "attention",
            "--model",
            lm_s,
            "--input",
            "the king",
            "--out",
            out_s,
        ],
        None,
    );
    assert!(
        !ok && err.contains("linear attention computes none"),
        "{err}"
    );
    let (ok, _, err) = qkv(&["embed", "--model", lm_s], Some("the king\n"));
    assert!(!ok && err.contains("is not an encoder"), "{err}");

    // The viewer in a real browser.
    let Some(bin) = chromium() else { return };
    let html = out.join("attention.html");
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        !text.contains("http://") && !text.contains("https://"),
        "the viewer must not fetch anything"
    );
    let profile = scratch("viz-chromium");
    let url = format!("file://{}", html.display());
    let dom = browser(&bin, &profile)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert_eq!(attr(&dom, "data-maps"), maps.len(), "maps rendered");
    assert_eq!(
        attr(&dom, "data-thumbs"),
        heads,
        "one overview thumbnail per layer and head"
    );
    // The first view is encoder self-attention: source labels on both axes.
    assert_eq!(attr(&dom, "data-row-labels"), src);
    assert_eq!(attr(&dom, "data-col-labels"), src);
    assert_eq!(attr(&dom, "data-cells"), src * src);
    assert_eq!(dom.matches("class=\"thumb").count(), heads);
    assert!(
        dom.contains("▁king") || dom.contains("king"),
        "token labels are shown"
    );

    let shot = out.join("screenshot.png");
    let status = browser(&bin, &profile)
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1280,900")
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(png_size(&shot), (1280, 900));
    // A rendered page, not a blank one: decode and count distinct colours.
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> =
        buf[..info.buffer_size()].chunks(channels).collect();
    assert!(
        colours.len() > 50,
        "the screenshot looks blank ({} colours)",
        colours.len()
    );
    let _ = std::fs::remove_dir_all(&profile);
}
