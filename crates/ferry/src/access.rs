//! `ferry token …`, `ferry project …`, `ferry user …`: thin adapters over the API.

use std::io::BufRead;

use clap::Subcommand;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::types::{CreateProjectRequest, CreateTokenRequest, CreateUserRequest};

use crate::cluster::Endpoint;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum TokenVerb {
    /// Make an API token; its secret is printed this once (etcd keeps only a hash).
    Create {
        /// `viewer`, `operator` or `admin`.
        #[arg(long)]
        role: String,
        /// Reach only this project's objects.
        #[arg(long)]
        project: Option<String>,
        /// e.g. `30d`; default: until revoked.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke { id: String },
    /// The SHA-256 of a secret read from stdin, for an agent config's bootstrap tokens.
    Hash,
}

#[derive(Subcommand)]
pub enum ProjectVerb {
    /// A project with its quota (unset limits are unlimited).
    Create {
        name: String,
        #[arg(long)]
        max_vms: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// e.g. `64G`.
        #[arg(long)]
        max_memory: Option<String>,
        /// e.g. `2T`.
        #[arg(long)]
        max_disk: Option<String>,
        #[arg(long)]
        max_backups: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Projects with their quotas and what they use.
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a project that holds no VM.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum UserVerb {
    /// A portal user; the password is read from stdin (one line).
    Create {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        project: Option<String>,
    },
    /// Set a user's password, read from stdin (one line).
    Passwd { name: String },
    /// Delete a user and end its sessions.
    Delete { name: String },
    List {
        #[arg(long)]
        json: bool,
    },
}

fn read_secret_line(what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!line.is_empty(), "no {what} on stdin");
    Ok(line)
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(header.to_vec());
    table
}

fn limit(value: Option<impl ToString>) -> String {
    value.map_or("-".to_string(), |value| value.to_string())
}

pub async fn run_token(endpoint: &Endpoint, verb: TokenVerb) -> anyhow::Result<()> {
    if let TokenVerb::Hash = verb {
        println!(
            "{}",
            ferry_api::auth::sha256_hex(&read_secret_line("secret")?)
        );
        return Ok(());
    }
    let client = endpoint.client()?;
    match verb {
        TokenVerb::Create {
            role,
            project,
            expires,
            comment,
            json,
        } => {
            let created = client
                .create_token(&CreateTokenRequest {
                    role,
                    project,
                    expires,
                    comment,
                })
                .await?;
            if json {
                return print_json(&created);
            }
            eprintln!(
                "token {} ({}{}): keep the secret, it is not shown again",
                created.token.id,
                created.token.role,
                created
                    .token
                    .project
                    .as_ref()
                    .map_or(String::new(), |project| format!(", project {project}"))
            );
            println!("{}", created.secret);
        }
        TokenVerb::List { json } => {
            let tokens = client.list_tokens().await?;
            if json {
                return print_json(&tokens);
            }
            let mut out = table(&["ID", "ROLE", "PROJECT", "EXPIRES", "COMMENT"]);
            for token in &tokens {
                out.add_row([
                    token.id.clone(),
                    token.role.clone(),
                    limit(token.project.as_ref()),
                    token.expires_ms.map_or("never".to_string(), |ms| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                        )
                        .to_string()
                    }),
                    token.comment.clone(),
                ]);
            }
            println!("{out}");
        }
        TokenVerb::Revoke { id } => {
            client.revoke_token(&id).await?;
            println!("token {id} revoked");
        }
        TokenVerb::Hash => {}
    }
    Ok(())
}

fn projects_table(projects: &[ferry_api::types::ProjectView]) -> Table {
    let mut out = table(&["PROJECT", "VMS", "VCPUS", "MEMORY MIB", "DISK GIB"]);
    for project in projects {
        out.add_row([
            project.name.clone(),
            format!("{} / {}", project.vms, limit(project.max_vms)),
            format!("{} / {}", project.vcpus, limit(project.max_vcpus)),
            format!("{} / {}", project.memory_mib, limit(project.max_memory_mib)),
            format!("{} / {}", project.disk_gib, limit(project.max_disk_gib)),
        ]);
    }
    out
}

pub async fn run_project(endpoint: &Endpoint, verb: ProjectVerb) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    match verb {
        ProjectVerb::Create {
            name,
            max_vms,
            max_vcpus,
            max_memory,
            max_disk,
            max_backups,
            json,
        } => {
            let project = client
                .create_project(&CreateProjectRequest {
                    name,
                    max_vms,
                    max_vcpus,
                    max_memory,
                    max_disk,
                    max_backups,
                })
                .await?;
            if json {
                return print_json(&project);
            }
            println!("{}", projects_table(&[project]));
        }
        ProjectVerb::List { json } => {
            let projects = client.list_projects().await?;
            if json {
                return print_json(&projects);
            }
            println!("{}", projects_table(&projects));
        }
        ProjectVerb::Show { name, json } => {
            let project = client.get_project(&name).await?;
            if json {
                return print_json(&project);
            }
            println!("{}", projects_table(&[project]));
        }
        ProjectVerb::Delete { name } => {
            client.delete_project(&name).await?;
            println!("project {name} deleted");
        }
    }
    Ok(())
}

pub async fn run_user(endpoint: &Endpoint, verb: UserVerb) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    match verb {
        UserVerb::Create {
            name,
            role,
            project,
        } => {
            let password = read_secret_line("password")?;
            let user = client
                .create_user(&CreateUserRequest {
                    name,
                    password,
                    role,
                    project,
                })
                .await?;
            println!("user {} ({}) created", user.name, user.role);
        }
        UserVerb::Passwd { name } => {
            let password = read_secret_line("password")?;
            client.set_password(&name, &password).await?;
            println!("password of user {name} set");
        }
        UserVerb::Delete { name } => {
            client.delete_user(&name).await?;
            println!("user {name} deleted");
        }
        UserVerb::List { json } => {
            let users = client.list_users().await?;
            if json {
                return print_json(&users);
            }
            let mut out = table(&["USER", "ROLE", "PROJECT"]);
            for user in &users {
                out.add_row([
                    user.name.clone(),
                    user.role.clone(),
                    limit(user.project.as_ref()),
                ]);
            }
            println!("{out}");
        }
    }
    Ok(())
}
