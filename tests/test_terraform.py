"""terraform/: the AWS root module and its examples, checked offline (no provider downloads here).

Every file parses (python-hcl2); structural invariants hold on the parsed module (encryption at rest
and in transit everywhere, no public bucket or endpoint, nodes and stores in private subnets, every
variable described, tags on every taggable resource, KMS rotation); checkov, in its own venv, finds 0
failed checks with every skip carrying its reason; `terraform fmt -check` passes where a terraform
binary is on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "terraform"


def _unq(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1]
    if isinstance(v, dict):
        return {_unq(k): _unq(x) for k, x in v.items() if k not in ("__is_block__",)}
    if isinstance(v, list):
        return [_unq(x) for x in v]
    return v


def _module(folder: Path) -> dict[str, dict]:
    """{block type: {name or (resource type, name): body}} of every .tf file in ``folder``."""
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("*.tf")):
        doc = _unq(hcl2.load(f.open()))
        for kind, blocks in doc.items():
            for block in blocks if isinstance(blocks, list) else [blocks]:
                for k1, v1 in block.items():
                    if kind in ("resource", "data"):
                        for k2, v2 in v1.items():
                            out.setdefault(kind, {})[(k1, k2)] = v2
                    else:
                        out.setdefault(kind, {})[k1] = v1
    return out


@pytest.fixture(scope="module")
def tf() -> dict[str, dict]:
    return _module(TF)


def _resources(tf, rtype: str) -> dict[str, dict]:
    return {name: body for (t, name), body in tf["resource"].items() if t == rtype}


def _one(block):
    return block[0] if isinstance(block, list) else block


def test_every_file_parses_and_the_layout_is_one_file_per_concern():
    files = {f.name for f in TF.glob("*.tf")}
    assert {"versions.tf", "variables.tf", "outputs.tf", "vpc.tf", "eks.tf", "s3.tf", "msk.tf", "rds.tf", "elasticache.tf",
            "security_groups.tf", "kms.tf", "cloudwatch.tf", "iam.tf", "helm.tf"} <= files
    for f in [*TF.glob("*.tf"), *TF.glob("examples/*/*.tf")]:
        hcl2.load(f.open())
    for env in ("dev", "prod"):
        ex = _module(TF / "examples" / env)
        assert ex["module"]["raystream"]["source"] == "../.."


def test_every_variable_is_described_and_validated_where_it_can_be(tf):
    variables = tf["variable"]
    assert all(v.get("description", "").strip() for v in variables.values()), [k for k, v in variables.items() if not v.get("description")]
    validated = {k for k, v in variables.items() if v.get("validation")}
    assert {"name", "environment", "azs", "vpc_cidr", "eks_version", "admin_cidrs", "on_demand_nodes", "spot_nodes",
            "rds_backup_retention_days", "log_retention_days"} <= validated
    assert all(o.get("description", "").strip() for o in tf["output"].values())


def test_encryption_everywhere(tf):
    # every bucket is in local.buckets, which the encryption, public-access, versioning and ownership resources cover
    buckets = tf["locals"]["buckets"]
    assert {v.split(".")[1] for v in buckets.values()} == set(_resources(tf, "aws_s3_bucket"))
    for rtype in ("aws_s3_bucket_server_side_encryption_configuration", "aws_s3_bucket_public_access_block",
                  "aws_s3_bucket_versioning", "aws_s3_bucket_ownership_controls"):
        assert [r["for_each"] for r in _resources(tf, rtype).values()] == ["${local.buckets}"], rtype
    for name, s in _resources(tf, "aws_s3_bucket_server_side_encryption_configuration").items():
        rule = _one(_one(s["rule"])["apply_server_side_encryption_by_default"])
        assert rule["sse_algorithm"] == "aws:kms" and "aws_kms_key" in rule["kms_master_key_id"], name
    for name, db in _resources(tf, "aws_db_instance").items():
        assert db["storage_encrypted"] is True and "aws_kms_key" in db["kms_key_id"] and db["manage_master_user_password"] is True
        assert db["performance_insights_kms_key_id"]
    for name, msk in _resources(tf, "aws_msk_cluster").items():
        enc = _one(msk["encryption_info"])
        transit = _one(enc["encryption_in_transit"])
        assert "aws_kms_key" in enc["encryption_at_rest_kms_key_arn"] and transit["client_broker"] == "TLS" and transit["in_cluster"] is True
        auth = _one(msk["client_authentication"])
        assert auth["unauthenticated"] is False and _one(auth["sasl"])["iam"] is True
    for name, rg in _resources(tf, "aws_elasticache_replication_group").items():
        assert rg["at_rest_encryption_enabled"] is True and rg["transit_encryption_enabled"] is True and rg["auth_token"]
        assert rg["multi_az_enabled"] is True and rg["automatic_failover_enabled"] is True
    eks = _one(list(_resources(tf, "aws_eks_cluster").values()))
    assert _one(eks["encryption_config"])["resources"] == ["secrets"]
    for name, lg in _resources(tf, "aws_cloudwatch_log_group").items():
        assert "aws_kms_key" in lg["kms_key_id"], name
    for name, key in _resources(tf, "aws_kms_key").items():
        assert key["enable_key_rotation"] is True, name
    for name, lt in _resources(tf, "aws_launch_template").items():
        ebs = _one(_one(lt["block_device_mappings"])["ebs"])
        assert ebs["encrypted"] is True and _one(lt["metadata_options"])["http_tokens"] == "required"
    for name, sec in _resources(tf, "aws_secretsmanager_secret").items():
        assert "aws_kms_key" in sec["kms_key_id"], name
    assert all("kms_master_key_id" in t for t in _resources(tf, "aws_sns_topic").values())


def test_nothing_public(tf):
    blocks = _resources(tf, "aws_s3_bucket_public_access_block")  # for_each over every bucket (test above)
    for b in blocks.values():
        assert all(b[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))
    for name, pol in _resources(tf, "aws_s3_bucket_policy").items():
        doc = tf["data"][("aws_iam_policy_document", pol["policy"].split(".")[2])]
        tls = [s for s in doc["statement"] if s.get("sid") == "TlsOnly"]
        assert tls and tls[0]["effect"] == "Deny", name  # TLS-only
    eks = _one(list(_resources(tf, "aws_eks_cluster").values()))
    vpc = _one(eks["vpc_config"])
    assert vpc["endpoint_public_access"] is False and vpc["endpoint_private_access"] is True
    assert all(db["publicly_accessible"] is False for db in _resources(tf, "aws_db_instance").values())
    msk = _one(list(_resources(tf, "aws_msk_cluster").values()))
    assert _one(_one(_one(msk["broker_node_group_info"])["connectivity_info"])["public_access"])["type"] == "DISABLED"
    default_sg = _one(list(_resources(tf, "aws_default_security_group").values()))
    assert "ingress" not in default_sg and "egress" not in default_sg  # the default security group is closed
    for name, rule in _resources(tf, "aws_vpc_security_group_ingress_rule").items():
        assert rule.get("cidr_ipv4") != "0.0.0.0/0", name


def test_nodes_and_stores_live_in_private_subnets(tf):
    private = "aws_subnet.private"
    for name, ng in _resources(tf, "aws_eks_node_group").items():
        assert private in ng["subnet_ids"], name
    assert private in _one(_one(list(_resources(tf, "aws_eks_cluster").values()))["vpc_config"])["subnet_ids"]
    for rtype in ("aws_db_subnet_group", "aws_elasticache_subnet_group"):
        assert all(private in g["subnet_ids"] for g in _resources(tf, rtype).values())
    assert private in _one(_one(list(_resources(tf, "aws_msk_cluster").values()))["broker_node_group_info"])["client_subnets"]
    assert [ng["for_each"] for ng in _resources(tf, "aws_eks_node_group").values()] == ["${local.node_groups}"]
    groups = str(tf["locals"]["node_groups"])
    assert "ON_DEMAND" in groups and "SPOT" in groups
    assert len(_resources(tf, "aws_nat_gateway")) == 1 and _resources(tf, "aws_nat_gateway")["this"]["count"] == "${length(var.azs)}"
    assert _resources(tf, "aws_flow_log")["vpc"]["traffic_type"] == "ALL"


UNTAGGABLE = {"aws_default_security_group_rule", "aws_route", "aws_route_table_association", "aws_iam_role_policy",
              "aws_iam_role_policy_attachment", "aws_kms_alias", "aws_s3_bucket_ownership_controls",
              "aws_s3_bucket_public_access_block", "aws_s3_bucket_versioning", "aws_s3_bucket_server_side_encryption_configuration",
              "aws_s3_bucket_logging", "aws_s3_bucket_lifecycle_configuration", "aws_s3_bucket_policy", "aws_s3_bucket_notification",
              "aws_msk_configuration", "aws_secretsmanager_secret_version", "aws_sns_topic_subscription", "random_password",
              "helm_release"}


def test_every_taggable_resource_is_tagged(tf):
    untagged = [f"{t}.{n}" for (t, n), body in tf["resource"].items() if t not in UNTAGGABLE and "tags" not in body]
    assert untagged == []
    local_tags = str(tf["locals"])
    assert all(k in local_tags for k in ("Environment", "ManagedBy", "app.kubernetes.io/part-of"))


def test_the_operator_release_matches_the_manifests():
    tf = _module(TF)
    helm = _resources(tf, "helm_release")["kuberay_operator"]
    assert "cluster/helm/kuberay-operator-values.yaml" in helm["values"][0]
    values = yaml.safe_load((ROOT / "cluster/helm/kuberay-operator-values.yaml").read_text())
    assert values["image"]["tag"] == "v" + tf["variable"]["kuberay_chart_version"]["default"]
    from tests.test_cluster import K8S_VERSION

    assert K8S_VERSION.startswith(tf["variable"]["eks_version"]["default"] + ".")


def test_checkov_finds_no_failed_check_and_every_skip_says_why():
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "scripts/setup.sh installs checkov into .venv-checkov"
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE", "LOG_LEVEL": "WARNING"}
    out = subprocess.run([str(checkov), "-d", str(TF), "--framework", "terraform", "--skip-download", "--quiet", "--compact",
                          "-o", "cli"], capture_output=True, text=True, env=env, timeout=600)
    summary = re.search(r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", out.stdout)
    assert summary, out.stdout[-3000:] + out.stderr[-3000:]
    passed, failed, skipped = map(int, summary.groups())
    assert failed == 0 and passed > 300, out.stdout[-5000:]
    skips = [m for f in TF.rglob("*.tf") for m in re.findall(r"checkov:skip=([A-Z0-9_]+)(.*)", f.read_text())]
    assert skips and all(len(reason.strip(": ")) > 20 for _, reason in skips), skips


def test_terraform_fmt():
    if shutil.which("terraform") is None:
        pytest.skip("no terraform binary on PATH (the other checks need none)")
    out = subprocess.run(["terraform", "fmt", "-check", "-recursive", str(TF)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
