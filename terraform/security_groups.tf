# One security group per tier. The stores take connections from the EKS nodes only, on their own port;
# the nodes talk to each other (Ray picks ports) and out through the NAT gateways.

resource "aws_security_group" "nodes" {
  name        = "${var.name}-nodes"
  description = "EKS nodes: Ray pods (heads, workers, Serve replicas)"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-nodes" })
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_nodes" {
  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "-1"
  description                  = "node to node: Ray's GCS, raylets, object manager, workers, Serve"
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "nodes_from_control_plane" {
  for_each = { webhooks = 443, kubelet = 10250 }

  security_group_id            = aws_security_group.nodes.id
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = each.value
  to_port                      = each.value
  description                  = "EKS control plane to the ${each.key}"
  tags                         = local.tags
}

resource "aws_vpc_security_group_egress_rule" "nodes_out" {
  security_group_id = aws_security_group.nodes.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "nodes reach AWS APIs, the identity provider and image registries through the NAT gateways"
  tags              = local.tags
}

locals {
  # each store takes connections from the nodes only, on its own port
  stores = {
    msk   = { port = 9098, what = "MSK brokers: Kafka over TLS with IAM auth" }
    rds   = { port = 5432, what = "PostgreSQL" }
    redis = { port = 6379, what = "Redis over TLS with AUTH" }
  }
}

resource "aws_security_group" "store" {
  for_each    = local.stores
  name        = "${var.name}-${each.key}"
  description = "${each.value.what}, from the nodes"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-${each.key}" })
}

resource "aws_vpc_security_group_ingress_rule" "store_from_nodes" {
  for_each                     = local.stores
  security_group_id            = aws_security_group.store[each.key].id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  description                  = each.value.what
  tags                         = local.tags
}

resource "aws_security_group" "eks_api" {
  name        = "${var.name}-eks-api"
  description = "The private EKS API endpoint: from the nodes and the admin CIDRs"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${var.name}-eks-api" })
}

resource "aws_vpc_security_group_ingress_rule" "eks_api_from_nodes" {
  security_group_id            = aws_security_group.eks_api.id
  referenced_security_group_id = aws_security_group.nodes.id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  description                  = "kubelets, the KubeRay operator and the Ray autoscaler"
  tags                         = local.tags
}

resource "aws_vpc_security_group_ingress_rule" "eks_api_from_admins" {
  for_each          = toset(var.admin_cidrs)
  security_group_id = aws_security_group.eks_api.id
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  description       = "operators (VPN, bastion)"
  tags              = local.tags
}
