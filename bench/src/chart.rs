//! `chart.png`: max-throughput bars and latency percentiles per configuration.

use crate::report::Results;
use crate::stack::Mode;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Fonts tried, in order (Debian's fonts-dejavu-core ships the first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn load_font() -> Result<(), String> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps registered fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable font"));
        }
    }
    Err(format!("no font found (looked for {FONTS:?}; install fonts-dejavu-core)"))
}

/// One colour per configuration (a)..(f), in the order of `Mode::ALL`.
const COLORS: [RGBColor; 6] = [
    RGBColor(120, 120, 120),
    RGBColor(70, 130, 180),
    RGBColor(230, 170, 40),
    RGBColor(150, 90, 190),
    RGBColor(214, 96, 77),
    RGBColor(60, 160, 90),
];

fn color_of(mode: Mode) -> RGBColor {
    let i = Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0);
    COLORS.get(i).copied().unwrap_or(BLACK)
}

pub fn render(r: &Results, path: &std::path::Path) -> Result<(), String> {
    let n = r.main.len();
    if n == 0 {
        return Err("no results".into());
    }
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);

    let max_rps = r.main.iter().map(|m| m.throughput.rps).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption("Max throughput (req/s, closed loop)", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..max_rps.max(1.0))
        .map_err(|e| e.to_string())?;
    // Bars are named by key only ((a), (b), ...): the legend on the right
    // gives each configuration's full name in the same colour.
    let labels: Vec<String> = r.main.iter().map(|m| format!("({})", m.mode.key())).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("requests / s")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, m) in r.main.iter().enumerate() {
        let color = color_of(m.mode);
        let x0 = i as f64 + 0.15;
        let x1 = i as f64 + 0.85;
        chart
            .draw_series(std::iter::once(Rectangle::new([(x0, 0.0), (x1, m.throughput.rps)], color.filled())))
            .map_err(|e| e.to_string())?;
        let label = labels.get(i).cloned().unwrap_or_default();
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.0}", m.throughput.rps),
                (i as f64 + 0.3, m.throughput.rps + max_rps * 0.02),
                ("sans-serif", 16),
            )))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(label, (i as f64 + 0.35, max_rps * -0.035), ("sans-serif", 16))))
            .map_err(|e| e.to_string())?;
    }

    let max_ms = r.main.iter().map(|m| m.latency.p999_ms).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&right)
        .caption(format!("Latency at {:.0} req/s, open loop (ms)", r.settings.rate), ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..3.0, 0f64..max_ms.max(0.1))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("milliseconds")
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / n as f64;
    for (p, name) in ["p50", "p99", "p99.9"].iter().enumerate() {
        chart
            .draw_series(std::iter::once(Text::new(name.to_string(), (p as f64 + 0.4, max_ms * -0.035), ("sans-serif", 16))))
            .map_err(|e| e.to_string())?;
    }
    for (i, m) in r.main.iter().enumerate() {
        let color = color_of(m.mode);
        let values = [m.latency.p50_ms, m.latency.p99_ms, m.latency.p999_ms];
        chart
            .draw_series(values.iter().enumerate().map(|(p, v)| {
                let x0 = p as f64 + 0.1 + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(m.mode.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
