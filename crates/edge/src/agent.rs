//! Running an enrolled agent: load the identity, start the hub link and the
//! local API.

use std::net::SocketAddr;
use std::sync::Arc;

use protocol::DeviceId;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::insights::Insights;
use crate::link::Link;
use crate::local_api::{LocalState, router};
use crate::metrics::{AgentMetrics, Status};
use crate::state::{DataDir, State};
use crate::{Error, io_err};
use serving::{Admission, Inference};

/// A running agent.
#[derive(Debug)]
pub struct RunningAgent {
    /// This device.
    pub device_id: DeviceId,
    /// Where the local API listens.
    pub local_addr: SocketAddr,
    /// Live status.
    pub status: Arc<Status>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Serves until the local API stops (it does not stop on its own).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts the agent from its data directory.
pub async fn run(config: Config) -> Result<RunningAgent, Error> {
    let dir = DataDir::new(&config.data_dir);
    if !dir.database().exists() {
        return Err(Error::NotEnrolled {
            dir: config.data_dir.clone(),
        });
    }
    let state = State::open(&dir.database())?;
    let mut enrolment = state.enrolment()?.ok_or_else(|| Error::NotEnrolled {
        dir: config.data_dir.clone(),
    })?;
    if let Some(url) = &config.hub_url {
        tracing::info!(enrolled = %enrolment.hub_url, using = %url, "reaching the hub at another URL");
        enrolment.hub_url = url.clone();
    }
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).map_err(io_err(&p));
    let tls =
        pki::tls::device_client_config(&read(dir.ca())?, &read(dir.cert())?, &read(dir.key())?)?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(config.request_timeout)
        .build()
        .map_err(|e| Error::Unreachable {
            url: enrolment.hub_url.clone(),
            reason: crate::chain(&e),
        })?;

    // Which installed releases serve (a release left on trial by a run
    // that died is rolled back here), then load the catalogue with them.
    let disk = crate::updater::disk::Disk::new(dir.root());
    let resolved = crate::updater::resolve_installed(&disk, &state, &config.catalogue);
    let (loaded, embedders, models) = load_models(&config.catalogue, resolved.files).await;
    let (metrics, registry) = AgentMetrics::new();
    let status = Arc::new(Status::new(
        enrolment.clone(),
        state.last_message_seq()?,
        metrics.clone(),
        models,
    ));
    let insights = Arc::new(Insights::open(
        &dir.root().join("outbox"),
        config.outbox_budget_bytes,
        config.insight_window,
        config.anomaly_threshold,
    )?);
    status.set_installed(resolved.installed);
    let inference = Arc::new(
        Inference::new(
            loaded,
            Admission::new(
                config.max_concurrent,
                config.max_queued,
                config.queue_timeout,
            ),
        )
        .with_observer(Arc::new(crate::insights::InsightObserver(Arc::clone(
            &insights,
        )))),
    );

    let listener = TcpListener::bind(config.local_api_listen)
        .await
        .map_err(io_err(dir.root()))?;
    let local_addr = listener.local_addr().map_err(io_err(dir.root()))?;
    durable::write_atomic(
        &dir.local_api_addr(),
        format!("{local_addr}\n").as_bytes(),
        durable::PUBLIC,
    )
    .map_err(io_err(&dir.local_api_addr()))?;
    let routing = crate::route::Routing::new(crate::route::RoutingParts {
        inference: Arc::clone(&inference),
        config: config.router.clone(),
        catalogue: config.catalogue.clone(),
        client: client.clone(),
        hub_url: enrolment.hub_url.clone(),
        status: Arc::clone(&status),
        audit_path: dir.root().join("audit.log"),
        state: state.clone(),
    })?;
    let app = router(
        LocalState {
            status: Arc::clone(&status),
            registry,
            insights: Arc::clone(&insights),
        },
        metrics.http.clone(),
        Arc::clone(&inference),
        &routing,
    );
    let refresh = tokio::spawn(Arc::clone(&routing).refresh_loop());
    let serve = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "local API stopped");
        }
    });

    let batch_max = config.insight_batch_max;
    let fl_data = federated_data(&config, &embedders);
    let updater = crate::updater::Updater::new(crate::updater::UpdaterParts {
        data_dir: dir.root().to_owned(),
        state: state.clone(),
        status: Arc::clone(&status),
        inference: Arc::clone(&inference),
        catalogue: config.catalogue.clone(),
        embedders,
        registry: crate::updater::fetch::RegistryClient::new(
            client.clone(),
            &enrolment.hub_url,
            config.request_timeout,
        ),
        config: config.updates.clone(),
        backoff: (config.reconnect_min, config.reconnect_max),
    });
    let link = Link::new(
        client.clone(),
        Arc::clone(&status),
        state,
        config,
        Some(format!("http://{local_addr}")),
    )
    .with_updater(Arc::clone(&updater));
    let link = match fl_data {
        Some(data) => link.with_federated(data),
        None => link,
    };
    let updates = tokio::spawn(Arc::clone(&updater).run());
    let reports = tokio::spawn(updater.report_loop(
        client,
        format!("{}/v1/devices/{}", enrolment.hub_url, enrolment.device_id),
    ));
    let heartbeats = tokio::spawn(link.clone().heartbeat_loop());
    let stream = tokio::spawn(link.clone().stream_loop());
    let delivery = tokio::spawn(link.delivery_loop(Arc::clone(&insights), batch_max));
    let windows = tokio::spawn(close_windows(insights));
    tracing::info!(device = %enrolment.device_id, hub = %enrolment.hub_url, %local_addr, "agent running");
    Ok(RunningAgent {
        device_id: enrolment.device_id,
        local_addr,
        status,
        tasks: vec![
            serve, heartbeats, stream, delivery, windows, updates, reports, refresh,
        ],
    })
}

/// The local training data `[federated]` names, with the embedding model
/// that turns utterances into inputs; `None` when the device takes no part.
fn federated_data(
    config: &Config,
    embedders: &std::collections::BTreeMap<String, Arc<runtime::Embedder>>,
) -> Option<Arc<crate::federated::AgentData>> {
    let fl = &config.federated;
    if !fl.enabled {
        return None;
    }
    let embedder = match &fl.embedding_model {
        Some(id) => embedders.get(id).cloned(),
        None => config
            .catalogue
            .entries
            .iter()
            .find_map(|e| embedders.get(&e.id).cloned()),
    };
    let data = crate::federated::AgentData::new(fl, embedder);
    (!data.is_empty()).then(|| Arc::new(data))
}

/// Turns each closed window's counts into insights, once a second.
async fn close_windows(insights: Arc<Insights>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let drafts = insights.close_window(crate::insights::now_ms());
        if drafts.is_empty() {
            continue;
        }
        if let Err(e) = insights.append(drafts).await {
            tracing::error!(error = %e, "cannot store the window's insights");
        }
    }
}

/// Loads the catalogue off the async executor. A model that fails to load is
/// logged and reported in the status; the others are served.
async fn load_models(
    catalogue: &runtime::Catalogue,
    files: std::collections::BTreeMap<String, crate::updater::VerifiedFile>,
) -> (
    std::collections::BTreeMap<String, Arc<dyn runtime::ModelBackend>>,
    std::collections::BTreeMap<String, Arc<runtime::Embedder>>,
    Vec<protocol::LocalModel>,
) {
    let kinds: Vec<(String, String)> = catalogue
        .entries
        .iter()
        .map(|e| (e.id.clone(), e.spec.kind().to_string()))
        .collect();
    let catalogue = catalogue.clone();
    // Installed releases load only from files that verified.
    let paths: std::collections::BTreeMap<String, std::path::PathBuf> = files
        .into_iter()
        .map(|(id, f)| (id, f.path().to_owned()))
        .collect();
    let loaded =
        match tokio::task::spawn_blocking(move || runtime::catalogue::load(&catalogue, &paths))
            .await
        {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "model loading failed");
                runtime::LoadedModels::default()
            }
        };
    let mut statuses = Vec::new();
    for (id, kind) in kinds {
        let error = loaded
            .failures
            .iter()
            .find(|(failed, _)| *failed == id)
            .map(|(_, e)| e.to_string());
        match &error {
            Some(e) => {
                tracing::error!(model = %id, error = %e, "model failed to load; serving the others")
            }
            None => tracing::info!(model = %id, %kind, "model loaded"),
        }
        statuses.push(protocol::LocalModel {
            loaded: loaded.models.contains_key(&id),
            id,
            kind,
            error,
        });
    }
    (loaded.models, loaded.embedders, statuses)
}
