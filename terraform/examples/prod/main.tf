# raystream on AWS, prod: the root module with this environment's sizes. Run from this folder:
#   terraform init && terraform apply
# then follow docs/deploy.md (kubeconfig, Secrets, kubectl apply -k cluster/overlays/prod).

terraform {
  required_version = ">= 1.6.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80.0, < 6.0.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = ">= 2.17.0, < 3.0.0"
    }
  }
}

provider "aws" {
  region = "eu-west-1"

  default_tags {
    tags = { Project = "raystream" }
  }
}

# the API endpoint is private: run terraform from inside the VPC (a runner or VPN in admin_cidrs)
provider "helm" {
  kubernetes {
    host                   = module.raystream.cluster_endpoint
    cluster_ca_certificate = base64decode(module.raystream.cluster_certificate_authority_data)
    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.raystream.cluster_name]
    }
  }
}

module "raystream" {
  source = "../.."

  name        = "raystream-prod"
  environment = "prod"
  azs         = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
  vpc_cidr    = "10.20.0.0/16"
  admin_cidrs = ["10.200.0.0/24"]

  on_demand_nodes = { instance_types = ["m7i.xlarge"], min_size = 3, desired_size = 3, max_size = 9 }
  spot_nodes      = { instance_types = ["m7i.2xlarge", "m6i.2xlarge", "m7a.2xlarge"], min_size = 3, desired_size = 6, max_size = 40 }

  msk_instance_type         = "kafka.m7g.large"
  msk_volume_gb             = 2000
  rds_instance_class        = "db.m7g.xlarge"
  rds_allocated_storage_gb  = 500
  rds_backup_retention_days = 30
  redis_node_type           = "cache.m7g.large"
  alarm_emails              = ["oncall@example.com"]

  tags = { CostCenter = "data-platform" }
}

output "raystream" {
  description = "Everything docs/deploy.md needs from this environment."
  value       = module.raystream.overlay_values
}
