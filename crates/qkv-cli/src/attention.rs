//! `qkv attention`: the attention maps of one input, for every layer and head — PNG heatmaps
//! with token labels on both axes, `attention.json` with the weights, and one self-contained
//! HTML viewer (`assets/attention.html`: layer/head selectors, hover for the weight, and a
//! per-layer overview of every head, like bertviz's model view; no network access).

use crate::args::name_input;
use crate::plot::register_font;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use qkv::inspect::{inspect, Inspection, MapKind};
use qkv::model_dir::ModelDir;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct AttentionArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// The input text (the source sentence for translation).
    #[arg(long)]
    pub input: String,
    /// Translation: the target sentence to force (default: the model's own greedy
    /// translation).
    #[arg(long)]
    pub target: Option<String>,
    /// Output directory for the PNGs, attention.json and attention.html.
    #[arg(long, default_value = "attention")]
    pub out: PathBuf,
}

pub fn run(a: AttentionArgs) -> Result<()> {
    if a.input.trim().is_empty() {
        bail!("--input is empty");
    }
    let mut dir = ModelDir::load(&a.model)?;
    let ins =
        inspect(&mut dir, &a.input, a.target.as_deref()).map_err(|e| name_input(e, "input"))?;
    if ins.maps.is_empty() {
        bail!(
            "{}: this model has no attention weights to show (linear attention computes none)",
            a.model.display()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut pngs = 0;
    for m in &ins.maps {
        let (rows, cols) = labels_for(&ins, m.kind);
        for h in 0..m.heads {
            let path = a.out.join(format!(
                "{}-layer{}-head{}.png",
                kind_slug(m.kind),
                m.layer + 1,
                h + 1
            ));
            let title = format!(
                "{} · layer {} · head {}",
                kind_title(m.kind),
                m.layer + 1,
                h + 1
            );
            heatmap_png(&path, &title, m.head(h), rows, cols)?;
            pngs += 1;
        }
    }
    let data = json!({
        "model": a.model.display().to_string(),
        "input": a.input,
        "target": a.target,
        "source_tokens": ins.source,
        "target_tokens": ins.target,
        "maps": ins.maps,
    });
    let json_path = a.out.join("attention.json");
    std::fs::write(&json_path, serde_json::to_string(&data)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let html_path = a.out.join("attention.html");
    std::fs::write(&html_path, viewer_html(&data)?)
        .with_context(|| format!("writing {}", html_path.display()))?;
    eprintln!(
        "{} maps ({pngs} heads) → {}/*.png, {}",
        ins.maps.len(),
        a.out.display(),
        html_path.display()
    );
    Ok(())
}

/// (query labels, key labels) of a map kind.
fn labels_for(ins: &Inspection, kind: MapKind) -> (&[String], &[String]) {
    match kind {
        MapKind::EncoderSelf => (&ins.source, &ins.source),
        MapKind::DecoderSelf => (&ins.target, &ins.target),
        MapKind::Cross => (&ins.target, &ins.source),
    }
}

fn kind_slug(k: MapKind) -> &'static str {
    match k {
        MapKind::EncoderSelf => "encoder-self",
        MapKind::DecoderSelf => "decoder-self",
        MapKind::Cross => "cross",
    }
}

fn kind_title(k: MapKind) -> &'static str {
    match k {
        MapKind::EncoderSelf => "encoder self-attention",
        MapKind::DecoderSelf => "decoder masked self-attention",
        MapKind::Cross => "cross-attention",
    }
}

/// White → dark blue; the HTML viewer uses the same scale.
pub fn color(w: f32) -> (u8, u8, u8) {
    let w = w.clamp(0.0, 1.0);
    let mix = |lo: f32, hi: f32| (lo + (hi - lo) * w).round() as u8;
    (mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0))
}

/// Where the cells of a heatmap lie in its PNG.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub left: u32,
    pub top: u32,
    pub cell: u32,
    pub width: u32,
    pub height: u32,
}

const CELL: u32 = 26;
const FONT_PX: u32 = 13;
const TITLE_H: u32 = 34;

pub fn layout(rows: &[String], cols: &[String]) -> Layout {
    // A label is at most 24 characters (longer ones are cut); DejaVu at 13 px averages < 8 px.
    let chars = |ls: &[String]| {
        ls.iter()
            .map(|l| l.chars().count().min(24))
            .max()
            .unwrap_or(1)
    };
    let left = 16 + 8 * chars(rows) as u32;
    let top = TITLE_H + 16 + 8 * chars(cols) as u32;
    Layout {
        left,
        top,
        cell: CELL,
        width: left + CELL * cols.len() as u32 + 16,
        height: top + CELL * rows.len() as u32 + 16,
    }
}

fn short(label: &str) -> String {
    if label.chars().count() > 24 {
        label.chars().take(23).chain(['…']).collect()
    } else {
        label.to_string()
    }
}

/// One head's (rows × cols) weights as a labelled heatmap: query tokens down the left, key
/// tokens (rotated) along the top.
pub fn heatmap_png(
    path: &Path,
    title: &str,
    w: &[f32],
    rows: &[String],
    cols: &[String],
) -> Result<Layout> {
    register_font();
    let l = layout(rows, cols);
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (l.width, l.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let font = ("sans-serif", FONT_PX as f64).into_font();
    root.draw(&Text::new(
        title.to_string(),
        (8, 8),
        ("sans-serif", 16.0).into_font().color(&BLACK),
    ))
    .map_err(|e| err(&e))?;
    for (i, r) in rows.iter().enumerate() {
        let y = (l.top + l.cell * i as u32 + l.cell / 2) as i32;
        let style = font
            .clone()
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        root.draw(&Text::new(short(r), (l.left as i32 - 6, y), style))
            .map_err(|e| err(&e))?;
    }
    for (j, c) in cols.iter().enumerate() {
        let x = (l.left + l.cell * j as u32 + l.cell / 2) as i32;
        let style = font
            .clone()
            .transform(FontTransform::Rotate270)
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        root.draw(&Text::new(short(c), (x, l.top as i32 - 6), style))
            .map_err(|e| err(&e))?;
    }
    for i in 0..rows.len() {
        for j in 0..cols.len() {
            let (r, g, b) = color(w[i * cols.len() + j]);
            let x0 = (l.left + l.cell * j as u32) as i32;
            let y0 = (l.top + l.cell * i as u32) as i32;
            let rect = Rectangle::new(
                [(x0, y0), (x0 + l.cell as i32 - 1, y0 + l.cell as i32 - 1)],
                RGBColor(r, g, b).filled(),
            );
            root.draw(&rect).map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(l)
}

static VIEWER: &str = include_str!("../assets/attention.html");

/// The viewer with the data inlined (`</` escaped so the JSON cannot close its script tag).
fn viewer_html(data: &serde_json::Value) -> Result<String> {
    let json = serde_json::to_string(data)?.replace("</", "<\\/");
    let marker = "/*QKV_DATA*/null";
    if !VIEWER.contains(marker) {
        bail!("the viewer template lost its data marker");
    }
    Ok(VIEWER.replace(marker, &json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        (info.width, info.height, buf[..info.buffer_size()].to_vec())
    }

    #[test]
    fn heatmap_cells_show_their_weights() {
        let rows: Vec<String> = ["<s>", "▁el", "▁rey"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cols: Vec<String> = ["▁the", "▁king", "</s>", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let w: Vec<f32> = (0..12).map(|i| i as f32 / 11.0).collect();
        let path = std::env::temp_dir().join(format!("qkv-heatmap-{}.png", std::process::id()));
        let l = heatmap_png(&path, "test", &w, &rows, &cols).unwrap();
        let (width, height, px) = decode_png(&path);
        assert_eq!((width, height), (l.width, l.height));
        assert_eq!(l, layout(&rows, &cols));
        for i in 0..rows.len() {
            for j in 0..cols.len() {
                let x = l.left + l.cell * j as u32 + l.cell / 2;
                let y = l.top + l.cell * i as u32 + l.cell / 2;
                let o = ((y * width + x) * 3) as usize;
                let want = color(w[i * cols.len() + j]);
                assert_eq!((px[o], px[o + 1], px[o + 2]), want, "cell ({i}, {j})");
            }
        }
        // Labels were drawn: dark pixels left of the cells and above them.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1).any(|y| (x0..x1).any(|x| px[((y * width + x) * 3) as usize] < 100))
        };
        assert!(dark(0, l.left, l.top, l.height), "no row labels");
        assert!(dark(l.left, l.width, TITLE_H, l.top), "no column labels");
        let _ = std::fs::remove_file(path);
    }
}
