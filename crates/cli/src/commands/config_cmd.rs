//! `gpualloc config …`: the contexts in the config file.

use clap::{Args, Subcommand};

use crate::{
    Global,
    config::{self, Context},
    exit::Failure,
    output,
};

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// The context in force, resolved (token hidden).
    View,
    /// Every context; `*` marks the current one.
    GetContexts,
    /// Make a context the current one.
    #[command(after_help = "Example: gpualloc config use-context prod")]
    UseContext { name: String },
    /// Create or change a context.
    #[command(
        after_help = "Examples:\n  gpualloc config set-context prod --gateway https://gpualloc.example.com \
                            --token-command 'my-sso token gpualloc'\n  \
                            gpualloc config set-context ml --token-command 'cargo xtask token --tenant ml-team'"
    )]
    SetContext(SetContext),
}

#[derive(Debug, Args)]
pub struct SetContext {
    pub name: String,
    #[arg(long)]
    pub gateway: Option<String>,
    #[arg(long)]
    pub allocation: Option<String>,
    #[arg(long)]
    pub resource_pool: Option<String>,
    #[arg(long)]
    pub viewer: Option<String>,
    #[arg(long)]
    pub token: Option<String>,
    #[arg(long)]
    pub token_command: Option<String>,
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
}

pub fn run(global: &Global, cmd: ConfigCmd) -> Result<(), Failure> {
    let path = config::path(global);
    let mut file = config::load(&path)?;
    match cmd {
        ConfigCmd::View => {
            let r = config::resolve(global)?;
            output::out(&format!(
                "context: {}\nconfig: {}\nallocation: {}\nresource-pool: {}\nviewer: {}\ntoken: {}\n",
                r.context,
                path.display(),
                r.allocation,
                r.resource_pool,
                r.viewer,
                if r.token.is_some() { "set" } else { "none" }
            ));
            Ok(())
        }
        ConfigCmd::GetContexts => {
            let current = global
                .context
                .clone()
                .or(file.current_context.clone())
                .unwrap_or_else(|| config::LOCAL.into());
            for name in config::known(&file) {
                let mark = if name == current { "*" } else { " " };
                output::out(&format!("{mark} {name}\n"));
            }
            Ok(())
        }
        ConfigCmd::UseContext { name } => {
            if !config::known(&file).contains(&name) {
                return Err(Failure::usage(format!(
                    "no context {name:?} (known: {})",
                    config::known(&file).join(", ")
                )));
            }
            file.current_context = Some(name.clone());
            config::save(&path, &file)?;
            output::out(&format!("now using context {name}\n"));
            Ok(())
        }
        ConfigCmd::SetContext(s) => {
            let ctx = file
                .contexts
                .entry(s.name.clone())
                .or_insert_with(Context::default);
            macro_rules! set {
                ($($f:ident),*) => { $(if s.$f.is_some() { ctx.$f = s.$f.clone(); })* };
            }
            set!(
                gateway,
                allocation,
                resource_pool,
                viewer,
                token,
                token_command,
                ca_file
            );
            config::save(&path, &file)?;
            output::out(&format!("context {} saved in {}\n", s.name, path.display()));
            Ok(())
        }
    }
}
