--- The `:AnchorCoder` user command. Defined by plugin/anchorcoder.lua and again by setup(), so it
--- exists also when only lua/ is on 'runtimepath' (the whole repository as the plugin).
local M = {}

M.subcommands = { 'status', 'enable', 'disable', 'pull', 'install' }

function M.create()
  vim.api.nvim_create_user_command('AnchorCoder', function(args)
    require('anchorcoder').command(args)
  end, {
    nargs = '*',
    complete = function(lead, line)
      local words = vim.split(vim.trim(line), '%s+')
      local choices = M.subcommands
      if #words >= 2 and words[2] == 'install' and (#words > 2 or line:match('%s$')) then
        choices = { 'source', 'release' }
      end
      return vim.tbl_filter(function(c)
        return vim.startswith(c, lead)
      end, choices)
    end,
    desc = 'AnchorCoder: status, enable, disable, pull, install [source|release]',
  })
end

return M
