//! Grouped bar charts for benchmark reports, drawn with plotters' SVG backend.
//!
//! [`chart`] renders one SVG document of [`Panel`]s (two per row when there are several), each a
//! grouped bar chart: one group per x-axis label, one bar per [`Series`] in each group, a
//! legend, a y axis in the panel's unit and the value printed on every bar. Values that are
//! NaN, infinite or missing draw no bar and are labelled "n/a"; zero draws no bar.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One data series: a name for the legend and one value per group of its [`Panel`]. Missing
/// trailing values count as "n/a".
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// One value per group, in the order of [`Panel::groups`].
    pub values: Vec<f64>,
}

/// One grouped bar chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Panel heading.
    pub title: String,
    /// Unit of the values, shown on the y axis and after each bar's value (may be empty).
    pub unit: String,
    /// X-axis labels, one per group of bars.
    pub groups: Vec<String>,
    /// The series; each contributes one bar to every group.
    pub series: Vec<Series>,
}

/// Bar colours, assigned to series in order (Tableau 10).
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// One panel's size in pixels.
const PANEL_SIZE: (u32, u32) = (620, 340);
/// The document title's height.
const TITLE_HEIGHT: u32 = 40;
/// Share of a group's width its bars take (the rest separates groups).
const GROUP_FILL: f64 = 0.8;
/// Headroom above the tallest bar, for its value label and the legend.
const HEADROOM: f64 = 1.45;
const FONT: &str = "sans-serif";

/// Renders `panels` as one SVG document titled `title`: two panels per row when there are
/// several.
pub fn chart(title: &str, panels: &[Panel]) -> anyhow::Result<String> {
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (PANEL_SIZE.0 * cols as u32, TITLE_HEIGHT + PANEL_SIZE.1 * rows as u32);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, (FONT, 20))?;
        for (panel, area) in panels.iter().zip(root.split_evenly((rows, cols))) {
            draw_panel(&area, panel)?;
        }
        root.present()?;
    }
    Ok(out)
}

/// The bar of series `k` of `m` in group `i`: its left and right x.
fn bar_span(i: usize, k: usize, m: usize) -> (f64, f64) {
    let w = GROUP_FILL / m as f64;
    let left = i as f64 - GROUP_FILL / 2.0 + k as f64 * w;
    (left + 0.06 * w, left + 0.94 * w)
}

fn draw_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, panel: &Panel) -> anyhow::Result<()> {
    let n = panel.groups.len();
    let m = panel.series.len();
    let value = |s: &Series, i: usize| s.values.get(i).copied().filter(|v| v.is_finite());
    let top = panel.series.iter().flat_map(|s| (0..n).filter_map(|i| value(s, i))).fold(0.0f64, f64::max);
    if n == 0 || m == 0 {
        let inner = area.titled(&panel.title, (FONT, 15))?;
        let (w, h) = inner.dim_in_pixel();
        inner.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Center))))?;
        return Ok(());
    }
    let y_max = if top > 0.0 { top * HEADROOM } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 15))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)?;
    let groups = &panel.groups;
    let group_label = |x: &f64| {
        let i = x.round();
        match (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
            true => groups[i as usize].clone(),
            false => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&group_label)
        .x_label_style((FONT, 11))
        .y_labels(5)
        .y_label_formatter(&|v| format_value(*v))
        .y_desc(panel.unit.as_str())
        .max_light_lines(0)
        .bold_line_style(BLACK.mix(0.1))
        .draw()?;
    let label_font = TextStyle::from((FONT, 10).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (k, s) in panel.series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let bars = (0..n).filter_map(|i| value(s, i).filter(|v| *v > 0.0).map(|v| (i, v))).map(|(i, v)| {
            let (l, r) = bar_span(i, k, m);
            Rectangle::new([(l, 0.0), (r, v)], color.filled())
        });
        chart.draw_series(bars)?.label(s.name.as_str()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let labels = (0..n).map(|i| {
            let (l, r) = bar_span(i, k, m);
            let v = value(s, i);
            let text = match v {
                Some(v) if panel.unit.is_empty() => format_value(v),
                Some(v) => format!("{} {}", format_value(v), panel.unit),
                None => "n/a".to_string(),
            };
            Text::new(text, ((l + r) / 2.0, v.unwrap_or(0.0).max(0.0)), label_font.clone())
        });
        chart.draw_series(labels)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 11))
        .draw()?;
    Ok(())
}

/// A value to at most 3 significant digits: "412", "41.2", "0.0412", "1234" (integers below
/// 10,000 keep all their digits), "12.3k", "4.57M", "1.2G"; "n/a" for NaN and infinities.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let rounded = round_significant(v, 3);
    let a = rounded.abs();
    if a >= 1e4 {
        for (scale, suffix) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
            if a >= scale || suffix == "k" {
                return format!("{}{}", plain(rounded / scale), suffix);
            }
        }
    }
    if v.abs() >= 1e3 {
        return format!("{:.0}", v);
    }
    if a < 1e-9 {
        return format!("{:.2e}", v);
    }
    plain(rounded)
}

/// `v` (already rounded to 3 significant digits, |v| < 1000 or so) without trailing zeros.
fn plain(v: f64) -> String {
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{:.*}", decimals, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `v` rounded to `digits` significant digits.
fn round_significant(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    let r = (v * scale).round() / scale;
    if r.is_finite() {
        r
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, values: &[f64]) -> Series {
        Series { name: name.to_string(), values: values.to_vec() }
    }

    fn example() -> Vec<Panel> {
        let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        vec![
            Panel {
                title: "Stored after dedup".to_string(),
                unit: "MiB".to_string(),
                groups: groups(&["1 VM", "4 VMs", "16 VMs"]),
                series: vec![series("raw", &[256.0, 1024.0, 4096.0]), series("vmcsnap", &[100.0, 180.0, 412.3]), series("qemu file", &[255.0, 1020.0, f64::NAN])],
            },
            Panel {
                title: "Capture time".to_string(),
                unit: "s".to_string(),
                groups: groups(&["1 VM", "4 VMs", "16 VMs"]),
                series: vec![series("vmcsnap", &[0.41, 1.234, 3.5]), series("qemu file", &[0.9, 0.0, 12.0])],
            },
            Panel {
                title: "Throughput <per host> & more".to_string(),
                unit: "MiB/s".to_string(),
                groups: groups(&["host-a", "host-b", "a much longer host name", "d"]),
                series: vec![series("upload", &[812.0, 790.5, 12_345.0, -40.0]), series("restore", &[1500.0, 1499.0])],
            },
            Panel { title: "Empty".to_string(), unit: String::new(), groups: vec![], series: vec![] },
        ]
    }

    fn count(haystack: &str, needle: &str) -> usize {
        haystack.matches(needle).count()
    }

    fn escape(text: &str) -> String {
        text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    }

    /// `text` is drawn as a whole text element (plotters puts it on a line of its own).
    fn shown(svg: &str, text: &str) -> bool {
        svg.contains(&format!(">\n{}\n</text>", escape(text)))
    }

    #[test]
    fn chart_is_an_svg_with_every_name_and_value() {
        let panels = example();
        let svg = chart("vmcsnap benchmark", &panels).expect("chart");
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        for p in &panels {
            assert!(shown(&svg, &p.title), "{}", p.title);
            for g in &p.groups {
                assert!(shown(&svg, g), "group label {g}");
            }
            for s in &p.series {
                assert!(shown(&svg, &s.name), "legend {}", s.name);
            }
        }
        assert!(shown(&svg, "412 MiB"), "value labels carry the unit");
        assert!(shown(&svg, "n/a"), "NaN and missing values are labelled n/a");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "no non-finite coordinates");
        assert!(shown(&svg, "no data"));
        // One bar per positive finite value: 8 + 5 + 5 (and one legend swatch per series).
        let bars = count(&svg, "<rect");
        assert!(bars >= 18 + 7, "{bars} rectangles");
    }

    #[test]
    fn chart_is_well_formed() {
        let svg = chart("a & b", &example()).expect("chart");
        assert_eq!(count(&svg, "<svg"), count(&svg, "</svg>"));
        assert_eq!(count(&svg, "<text"), count(&svg, "</text>"));
        for (i, _) in svg.match_indices('&') {
            let rest = &svg[i..];
            assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#"].iter().any(|e| rest.starts_with(e)), "raw & at {i}");
        }
        assert!(!svg.contains("<per host>"));
        assert!(svg.contains("&lt;per host&gt; &amp; more"));
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let nan_only = Panel {
            title: "nan".into(),
            unit: "x".into(),
            groups: vec!["g".into()],
            series: vec![series("s", &[f64::NAN]), series("t", &[f64::INFINITY]), series("z", &[0.0])],
        };
        let svg = chart("", &[nan_only]).expect("chart");
        assert_eq!(count(&svg, ">\nn/a\n<"), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let svg = chart("nothing", &[]).expect("chart");
        assert!(svg.contains("<svg") && svg.contains("nothing"));
    }

    #[test]
    fn values_print_with_three_significant_digits() {
        let cases = [
            (412.3, "412"),
            (41.23, "41.2"),
            (4.1, "4.1"),
            (2.0, "2"),
            (0.04123, "0.0412"),
            (1234.0, "1234"),
            (9999.6, "10k"),
            (12_345.0, "12.3k"),
            (999_600.0, "1M"),
            (4_567_000.0, "4.57M"),
            (1.2e9, "1.2G"),
            (-3.456, "-3.46"),
            (0.0, "0"),
            (f64::NAN, "n/a"),
        ];
        for (v, want) in cases {
            assert_eq!(format_value(v), want, "{v}");
        }
    }

    /// Writes an example chart for eyeballing (`$TMPDIR/example.svg`).
    #[test]
    fn write_example_svg() {
        let path = std::env::temp_dir().join("example.svg");
        std::fs::write(&path, chart("vmcsnap benchmark: 3 hosts, 16 VMs", &example()).expect("chart")).expect("write example.svg");
    }
}
