//! SVG plots of the results (plotters, no fonts needed: SVG text).

use std::path::Path;

use plotters::prelude::*;

use super::{
    e2e::{self, Datapath, Via},
    packet,
};

const COLOURS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

type Series = (String, Vec<(f64, f64)>);

/// One line chart over a log x axis of Service counts. `paired`: the
/// second half of the series are companions of the first (p99 of p50):
/// same colour, thin line, hollow points.
fn lines(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    paired: bool,
) -> anyhow::Result<()> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    let (x0, x1) = (
        xs.iter().copied().fold(f64::MAX, f64::min).max(1.0),
        xs.iter().copied().fold(1.0, f64::max),
    );
    let y1 = ys.iter().copied().fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.7..x1 * 1.4).log_scale(), 0.0..y1)?;
    chart
        .configure_mesh()
        .x_desc("Services in the datapath (log scale)")
        .y_desc(y_label)
        .x_label_formatter(&|x| super::thousands(x.round() as usize))
        .draw()?;
    let half = series.len().div_ceil(2);
    for (i, (name, pts)) in series.iter().enumerate() {
        let companion = paired && i >= half;
        let c = COLOURS[if paired { i % half } else { i } % COLOURS.len()];
        let width = if companion { 1 } else { 3 };
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(width)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
        let style = if companion {
            c.stroke_width(1)
        } else {
            c.filled()
        };
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, style)))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes every plot into `dir`; returns the files written.
pub fn write(
    dir: &Path,
    pkt: Option<&packet::Results>,
    e2e: Option<&e2e::Results>,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    if let Some(p) = pkt {
        let series: Vec<Series> = packet::ROWS
            .iter()
            .zip(&p.cost)
            .map(|(name, v)| {
                (
                    name.split(" (").next().unwrap_or(name).to_string(),
                    p.sizes
                        .iter()
                        .zip(v)
                        .map(|(n, c)| (*n as f64, c.0))
                        .collect(),
                )
            })
            .collect();
        let f = dir.join("packet-cost.svg");
        lines(
            &f,
            "Per-packet cost of the device path (BPF_PROG_TEST_RUN)",
            "ns per packet",
            &series,
            false,
        )?;
        files.push("packet-cost.svg".into());
    }
    if let Some(e) = e2e {
        for via in [Via::ClusterIp, Via::NodePort] {
            let tag = if via == Via::ClusterIp {
                "clusterip"
            } else {
                "nodeport"
            };
            // One series per datapath of `f(measure, floor)` over the sizes.
            let per = |f: &dyn Fn(&e2e::Measure, f64) -> Option<f64>| -> Vec<Series> {
                e2e::DATAPATHS
                    .iter()
                    .map(|dp| {
                        (
                            dp.label().to_string(),
                            e.sizes
                                .iter()
                                .filter_map(|n| {
                                    let floor = e.get(Datapath::Direct, via, *n)?.new_conn_per_s;
                                    Some((*n as f64, f(e.get(*dp, via, *n)?, floor)?))
                                })
                                .collect(),
                        )
                    })
                    .collect()
            };
            // Relative to the direct floor measured in the same turns: the
            // machine's drift between sizes cancels out.
            let ratio = per(&|m, floor| (floor > 0.0).then(|| m.new_conn_per_s / floor));
            let name = format!("new-connections-{tag}.svg");
            lines(
                &dir.join(&name),
                &format!(
                    "New connections per second through a {}, relative to direct",
                    via.label()
                ),
                "fraction of the direct-to-pod rate",
                &ratio,
                false,
            )?;
            files.push(name);
            let mut lat = per(&|m, _| Some(m.p50_us));
            for s in &mut lat {
                s.0 += " p50";
            }
            let mut p99 = per(&|m, _| Some(m.p99_us));
            for s in &mut p99 {
                s.0 += " p99";
            }
            lat.extend(p99);
            let name = format!("latency-{tag}.svg");
            lines(
                &dir.join(&name),
                &format!("Request latency through a {}", via.label()),
                "µs (thick: p50, thin: p99)",
                &lat,
                true,
            )?;
            files.push(name);
        }
    }
    Ok(files)
}
