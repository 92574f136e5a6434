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
/// same colour, thin line, hollow points. `log_y`: a log y axis too (for
/// figures that grow with the Service count).
fn lines(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    paired: bool,
    log_y: bool,
) -> anyhow::Result<()> {
    // A log y axis is drawn as a linear axis of log10 values, labelled
    // with the values themselves.
    let series: Vec<Series> = series
        .iter()
        .map(|(n, pts)| {
            let pts = pts
                .iter()
                .map(|&(x, y)| (x, if log_y { y.max(1e-9).log10() } else { y }))
                .collect();
            (n.clone(), pts)
        })
        .collect();
    let series = &series[..];
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
    let (y0, y1) = if log_y {
        let lo = ys.iter().copied().fold(f64::MAX, f64::min);
        let hi = ys.iter().copied().fold(f64::MIN, f64::max);
        (lo - 0.2, hi + 0.3)
    } else {
        (0.0, ys.iter().copied().fold(1.0, f64::max) * 1.15)
    };
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.7..x1 * 1.4).log_scale(), y0..y1)?;
    let unlog = |v: &f64| {
        let v = 10f64.powf(*v);
        if v >= 10.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("Services in the datapath (log scale)")
        .y_desc(y_label)
        .x_label_formatter(&|x| super::thousands(x.round() as usize));
    if log_y {
        mesh.y_label_formatter(&unlog);
    }
    mesh.draw()?;
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
                false,
            )?;
            files.push(name);
        }
    }
    Ok(files)
}

/// The agent alone (`bench --only agent`): start to every Service in the
/// maps, and peak RSS, fresh and restarted on its pinned maps, against the
/// number of Services. Returns the files written.
pub fn write_agent(
    dir: &Path,
    runs: &[(super::control::AgentRun, Option<super::control::AgentRun>)],
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let series = |f: &dyn Fn(&super::control::AgentRun) -> f64| -> Vec<Series> {
        vec![
            (
                "fresh start".to_string(),
                runs.iter()
                    .map(|(a, _)| (a.services as f64, f(a)))
                    .collect(),
            ),
            (
                "restarted on its pinned maps".to_string(),
                runs.iter()
                    .filter_map(|(_, b)| b.as_ref().map(|b| (b.services as f64, f(b))))
                    .collect(),
            ),
        ]
    };
    let sync = dir.join("agent-sync.svg");
    lines(
        &sync,
        "Agent start to every Service in the maps (10 endpoints each)",
        "seconds (log scale)",
        &series(&|a| a.full_sync_s),
        false,
        true,
    )?;
    let rss = dir.join("agent-rss.svg");
    lines(
        &rss,
        "Agent peak RSS (VmHWM), 10 endpoints per Service",
        "MiB (log scale)",
        &series(&|a| a.peak_rss_kib as f64 / 1024.0),
        false,
        true,
    )?;
    Ok(vec!["agent-sync.svg".into(), "agent-rss.svg".into()])
}
