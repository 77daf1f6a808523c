//! The loss curve of a run (`loss.png`) from its `metrics.csv`: training loss (mean over a
//! sliding window, since per-batch losses are noisy) and validation loss against the step.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use qkv::train::RowKind;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (see assets/DejaVuSans.LICENSE), embedded so plots render the same on machines
/// without system fonts.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only on a malformed font, which is embedded and tested.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// (train points, valid points) as (step, loss); training losses as a sliding-window mean,
/// since per-batch losses are noisy.
type Curves = (Vec<(f64, f64)>, Vec<(f64, f64)>);

fn read_metrics(csv: &Path) -> Result<Curves> {
    let rows = qkv::train::read_metrics(csv)?;
    let points = |kind| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r.kind == kind)
            .map(|r| (r.step as f64, r.loss))
            .collect()
    };
    let (train, valid) = (points(RowKind::Train), points(RowKind::Valid));
    let w = (train.len() / 50).max(1);
    let smooth = (0..train.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let mean = train[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
            (train[i].0, mean)
        })
        .collect();
    Ok((smooth, valid))
}

/// Draw `metrics.csv` of `run_dir` into `run_dir/loss.png` (800 × 500).
pub fn loss_curve(run_dir: &Path) -> Result<()> {
    register_font();
    let (train, valid) = read_metrics(&run_dir.join(qkv::train::METRICS_FILE))?;
    if train.is_empty() {
        return Ok(());
    }
    let out = run_dir.join("loss.png");
    let max_step = train.iter().chain(&valid).map(|p| p.0).fold(1.0, f64::max);
    let ys = train
        .iter()
        .chain(&valid)
        .map(|p| p.1)
        .filter(|y| y.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = BitMapBackend::new(&out, (800, 500)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("update")
        .y_desc("cross-entropy (nats/token)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("train (smoothed, with label smoothing)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !valid.is_empty() {
        chart
            .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("validation")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_series(valid.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
